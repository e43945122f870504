"""The built-in suites: each is an ordinary ablation config (TOML text), so a suite and a config file
take the same path (``rwkv-zoo ablate --suite NAME --show-config`` prints it, to copy and edit).

Every suite lists the causal softmax-attention baseline (registered name ``attn``) with
``optional = true``: it is in the grid when a plugin registers that version, and left out with a note
otherwise. It runs with ``token_shift = true`` (label ``attn+shift``): q, k and v also read the previous
token, as every RWKV version's inputs do and as Zoology's MQAR models get from a short convolution, so
the table compares recall mechanisms rather than how fast attention grows a previous-token head (quick's
MQAR after 400 steps at 1e-3: 0.12 without the shift, 1.00 with it; docs/ablations.md).

Wall times are for 2 shared CPU cores (``jobs = 2``, one torch thread each); see docs/ablations.md for
the measured ones.
"""

from __future__ import annotations

# v4-v7 (+ attention) at one tiny shape on MQAR; each model at its best of four learning rates (two seeds
# each). The README's main job. With 1e-3..1e-2 v5-v6 chose the lowest rate and v4 the highest; this grid
# brackets both. 600 steps: at 400 a v7 seed could end in the middle of its drop off the MQAR plateau (the
# seed spread was the budget; docs/ablations.md), which the faster CPU training path pays for.
QUICK = """
[ablate]
name = "quick"
description = "v4-v7 (+ attention) on MQAR, 2 x 64, each at its best of 4 learning rates, 2 seeds"
seeds = [0, 1]
lrs = [3e-4, 1e-3, 3e-3, 1e-2]
lr_final_ratio = 0.1
jobs = 2
threads = 1

[train]
steps = 600
batch_size = 16
warmup_steps = 20
schedule = "cosine"
weight_decay = 0.0
grad_clip = 1.0
eval_batches = 4
eval_batch_size = 64

[[models]]
model = "v4"
n_layer = 2
n_embd = 64

[[models]]
model = "v5"
n_layer = 2
n_embd = 64
head_size = 16

[[models]]
model = "v6"
n_layer = 2
n_embd = 64
head_size = 16

[[models]]
model = "v7"
n_layer = 2
n_embd = 64
head_size = 16

[[models]]
label = "attn+shift"
model = "attn"
optional = true
token_shift = true
window = 32  # = T: the whole sequence, and the state is the KV cache it really needs
n_layer = 2
n_embd = 64
head_size = 16

[[tasks]]
label = "mqar"
task = "mqar"
num_pairs = 8
num_keys = 32
num_values = 32
seq_len = 32
"""

# Zoology-style: MQAR over model width; accuracy against state size. One task trains on a mixture of 4, 8
# and 16 pairs at T = 64 (Zoology trains on mixtures too) and reports accuracy at each count: 16 pairs in
# a 2-head layer is where state size starts to matter. 800 steps: at 250 steps (the first version of this
# suite) every model was still on the loss plateau; at 400 v7 ends mid-transition (0.22-0.89 over seeds).
# Three rates: with 1e-3 / 3e-3 only, v5 and v6 at width 128 chose the lower edge and 2 of 3 seeds stayed on
# the plateau; at 3e-4 v6 solves it in every seed (0.984), which reversed the v6 / v7 order at that width.
RECALL = """
[ablate]
name = "recall"
description = "Zoology-style MQAR: width 32/64/128, 4/8/16 pairs at T=64, 800 steps, 3 learning rates, 3 seeds"
seeds = [0, 1, 2]
lrs = [3e-4, 1e-3, 3e-3]
lr_final_ratio = 0.1
jobs = 2
threads = 1

[train]
steps = 800
batch_size = 16
warmup_steps = 20
schedule = "cosine"
grad_clip = 1.0
eval_batches = 2
eval_batch_size = 64

[[models]]
model = "v4"
n_layer = 2
n_embd = [32, 64, 128]

[[models]]
model = "v5"
n_layer = 2
n_embd = [32, 64, 128]
head_size = 16

[[models]]
model = "v6"
n_layer = 2
n_embd = [32, 64, 128]
head_size = 16

[[models]]
model = "v7"
n_layer = 2
n_embd = [32, 64, 128]
head_size = 16

[[models]]
label = "attn+shift"
model = "attn"
optional = true
token_shift = true
window = 64  # = T: the whole sequence, and the state is the KV cache it really needs
n_layer = 2
n_embd = [32, 64, 128]
head_size = 16

[[tasks]]
label = "mqar-T64"
task = "mqar"
num_pairs = [4, 8, 16]
num_keys = 32
num_values = 32
seq_len = 64
"""

# Byte-level language modelling on the Python stdlib's sources (split by file), held-out bits per
# byte, then the same held-out bytes read in windows of 4T and 16T with the state carried. Rates: with
# 2e-3 / 6e-3 every model chose 6e-3 (the edge); a one-seed probe of 6e-3 / 1.2e-2 / 2.4e-2 put every
# model's best at 1.2e-2, so this grid brackets it.
TEXT = """
[ablate]
name = "text"
description = "byte-level LM on the Python stdlib sources (split by file), bpb at T=128, 4T, 16T; 3 seeds"
seeds = [0, 1, 2]
lrs = [6e-3, 1.2e-2, 2.4e-2]
lr_final_ratio = 0.1
jobs = 2
threads = 1

[train]
steps = 300
batch_size = 16
ctx_len = 128
warmup_steps = 20
schedule = "cosine"
grad_clip = 1.0
eval_batches = 16  # 32 KiB of held-out text, read at T, 4T and 16T
eval_batch_size = 16

[[models]]
model = "v4"
n_layer = 2
n_embd = 64
vocab_size = 256

[[models]]
model = "v5"
n_layer = 2
n_embd = 64
head_size = 16
vocab_size = 256

[[models]]
model = "v6"
n_layer = 2
n_embd = 64
head_size = 16
vocab_size = 256

[[models]]
model = "v7"
n_layer = 2
n_embd = 64
head_size = 16
vocab_size = 256

[[models]]
label = "attn+shift"
model = "attn"
optional = true
token_shift = true
n_layer = 2
n_embd = 64
head_size = 16
vocab_size = 256

[[tasks]]
label = "stdlib"
corpus = "stdlib"
heldout = 0.1
max_bytes = 8000000
extrapolate = [4, 16]
"""

# Hybrids (plugins/hybrids.py) against their parents: v6 and v7 with each other's time-mix, a v4
# channel-mix under v7, and per-layer mixes. The training setting is quick's (600 steps, rates around the
# parents' best): at 300 steps every model ended mid-transition off the MQAR plateau,
# so the rows compared seeds' luck rather than architectures.
HYBRIDS = """
[ablate]
name = "hybrids"
description = "v6/v7 time-mix and channel-mix swaps and per-layer mixes against their parents on quick's MQAR; 3 seeds"
seeds = [0, 1, 2]
lrs = [1e-3, 3e-3]
lr_final_ratio = 0.1
jobs = 2
threads = 1

[train]
steps = 600
batch_size = 16
warmup_steps = 20
schedule = "cosine"
weight_decay = 0.0
grad_clip = 1.0
eval_batches = 4
eval_batch_size = 64

[[models]]
model = "v6"
n_layer = 2
n_embd = 64
head_size = 16

[[models]]
model = "v7"
n_layer = 2
n_embd = 64
head_size = 16

[[models]]
label = "v6+v7 time-mix"
model = "v6"
n_layer = 2
n_embd = 64
head_size = 16
time_mix = "v7"

[[models]]
label = "v7+v6 time-mix"
model = "v7"
n_layer = 2
n_embd = 64
head_size = 16
time_mix = "v6"

[[models]]
label = "v7+v4 channel-mix"
model = "v7"
n_layer = 2
n_embd = 64
head_size = 16
channel_mix = "v4"

[[models]]
label = "layers v4,v7"
model = "v7"
n_layer = 2
n_embd = 64
head_size = 16
layers = "v4,v7"

[[models]]
label = "layers v7,v4"
model = "v7"
n_layer = 2
n_embd = 64
head_size = 16
layers = "v7,v4"

[[models]]
label = "attn+shift"
model = "attn"
optional = true
token_shift = true
window = 32  # = T, as in quick
n_layer = 2
n_embd = 64
head_size = 16

[[tasks]]
label = "mqar"
task = "mqar"
num_pairs = 8
num_keys = 32
num_values = 32
seq_len = 32
"""

SUITES = {"quick": QUICK, "recall": RECALL, "text": TEXT, "hybrids": HYBRIDS}
DEFAULT_SUITE = "quick"
