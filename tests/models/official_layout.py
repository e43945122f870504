"""The official checkpoint layout of each version, transcribed from SPEC.md §3.1, §4.1, §5.1, §6.1.

Written independently of the model code so the key/shape tests compare two transcriptions.
"""

from __future__ import annotations


def official_shapes(version: str, L: int, C: int, V: int, F: int, N: int = 64, lora: dict | None = None):
    lora = lora or {}
    if version in ("v7a", "v8"):  # x070 keys plus the DeepEmbed channel-mix keys (RWKV-LM v7a / v8 rc00 demos)
        keys = official_shapes("v7", L, C, V, F, N, lora)
        for l in range(L):
            f = f"blocks.{l}.ffn."
            if version == "v7a":
                R = lora["dim_s_lora"]
                keys.update({f + "s_emb.weight": (V, R * R), f + "s_emb_x.weight": (R * R, C), f + "s0": (1, 1, F),
                             f + "s1": (C, R), f + "s2": (R, F)})
            else:
                keys[f + "enn.weight"] = (V, C)
        return keys
    H = C // N
    keys: dict[str, tuple[int, ...]] = {"emb.weight": (V, C)}
    for l in range(L):
        p = f"blocks.{l}."
        for ln in ("ln1", "ln2") + (("ln0",) if l == 0 else ()):
            keys[p + ln + ".weight"] = (C,)
            keys[p + ln + ".bias"] = (C,)
        a, f = p + "att.", p + "ffn."
        if version == "v4":
            keys[a + "time_decay"] = (C,)
            keys[a + "time_first"] = (C,)
            for m in "kvr":
                keys[a + f"time_mix_{m}"] = (1, 1, C)
            for m in ("key", "value", "receptance", "output"):
                keys[a + m + ".weight"] = (C, C)
        elif version == "v5":
            for m in "kvrg":
                keys[a + f"time_mix_{m}"] = (1, 1, C)
            keys[a + "time_decay"] = (H, N)
            keys[a + "time_faaaa"] = (H, N)
            for m in ("receptance", "key", "value", "output", "gate"):
                keys[a + m + ".weight"] = (C, C)
            keys[a + "ln_x.weight"] = (C,)
            keys[a + "ln_x.bias"] = (C,)
        elif version == "v6":
            Dm, Dd = lora["dim_mix_lora"], lora["dim_decay_lora"]
            for m in "xwkvrg":
                keys[a + f"time_maa_{m}"] = (1, 1, C)
            keys[a + "time_maa_w1"] = (C, 5 * Dm)
            keys[a + "time_maa_w2"] = (5, Dm, C)
            keys[a + "time_decay"] = (1, 1, C)
            keys[a + "time_decay_w1"] = (C, Dd)
            keys[a + "time_decay_w2"] = (Dd, C)
            keys[a + "time_faaaa"] = (H, N)
            for m in ("receptance", "key", "value", "output", "gate"):
                keys[a + m + ".weight"] = (C, C)
            keys[a + "ln_x.weight"] = (C,)
            keys[a + "ln_x.bias"] = (C,)
        elif version == "v7":
            for m in ("r", "w", "k", "v", "a", "g"):
                keys[a + f"x_{m}"] = (1, 1, C)
            for name, d in (("w", "dim_w_lora"), ("a", "dim_a_lora"), ("v", "dim_v_lora"), ("g", "dim_g_lora")):
                keys[a + f"{name}1"] = (C, lora[d])
                keys[a + f"{name}2"] = (lora[d], C)
                if name != "g":
                    keys[a + f"{name}0"] = (1, 1, C)
            keys[a + "k_k"] = (1, 1, C)
            keys[a + "k_a"] = (1, 1, C)
            keys[a + "r_k"] = (H, N)
            for m in ("receptance", "key", "value", "output"):
                keys[a + m + ".weight"] = (C, C)
            keys[a + "ln_x.weight"] = (C,)
            keys[a + "ln_x.bias"] = (C,)
        elif version == "attn":  # plugins/attention.py: its own layout (no release exists)
            for m in ("query", "key", "value", "output"):
                keys[a + m + ".weight"] = (C, C)
        # channel mix
        if version == "attn":  # a plain MLP: no token-shift mix, no receptance
            keys[f + "key.weight"] = (F, C)
            keys[f + "value.weight"] = (C, F)
            continue
        if version in ("v4", "v5"):
            keys[f + "time_mix_k"] = (1, 1, C)
            keys[f + "time_mix_r"] = (1, 1, C)
        elif version == "v6":
            keys[f + "time_maa_k"] = (1, 1, C)
            keys[f + "time_maa_r"] = (1, 1, C)
        else:
            keys[f + "x_k"] = (1, 1, C)
        keys[f + "key.weight"] = (F, C)
        if version != "v7":
            keys[f + "receptance.weight"] = (C, C)
        keys[f + "value.weight"] = (C, F)
    keys["ln_out.weight"] = (C,)
    keys["ln_out.bias"] = (C,)
    keys["head.weight"] = (V, C)
    return keys


def official_param_count(version: str, L: int, C: int, V: int, lora: dict | None = None) -> int:
    """The parameter formulas of SPEC.md §3.8, §4.8, §5.7, §6.7 (F = 4C or 3.5C as released)."""
    lora = lora or {}
    if version == "v4":
        return 2 * V * C + 4 * C + L * (13 * C * C + 11 * C)
    if version == "v5":
        return 2 * V * C + 4 * C + L * (13 * C * C + 14 * C)
    if version == "v6":
        Dm, Dd = lora["dim_mix_lora"], lora["dim_decay_lora"]
        return 2 * V * C + 4 * C + L * (13 * C * C + 16 * C + 10 * Dm * C + 2 * Dd * C)
    if version == "v7":
        s = lora["dim_w_lora"] + lora["dim_a_lora"] + lora["dim_v_lora"] + lora["dim_g_lora"]
        return 2 * V * C + 4 * C + L * (19 * C + 12 * C * C + 2 * C * s)
    if version == "v7a":  # v7 plus, per layer, s_emb [V, R^2], s_emb_x [R^2, C], s1 [C, R], s2 [R, 4C], s0 [4C]
        R, F = lora["dim_s_lora"], 4 * C
        return official_param_count("v7", L, C, V, lora) + L * (V * R * R + R * R * C + C * R + R * F + F)
    if version == "v8":  # v7 plus, per layer, enn [V, C]
        return official_param_count("v7", L, C, V, lora) + L * V * C
    raise ValueError(version)
