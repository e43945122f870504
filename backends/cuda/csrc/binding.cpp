// Torch binding of the CUDA WKV launchers (wkv_launch.h). The Python side (backends/cuda/_ops.py)
// allocates every output and calls these with contiguous tensors on one device; this file only checks
// what a wrong call would silently corrupt, maps the dtype, and launches on torch's current stream.
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "wkv_launch.h"

namespace {

using rwkv_zoo_cuda::DType;

int dtype_of(const torch::Tensor& t) {
  switch (t.scalar_type()) {
    case torch::kFloat32: return rwkv_zoo_cuda::kF32;
    case torch::kBFloat16: return rwkv_zoo_cuda::kBF16;
    case torch::kFloat16: return rwkv_zoo_cuda::kF16;
    default: TORCH_CHECK(false, "rwkv_zoo cuda kernels take float32, bfloat16 or float16, got ", t.scalar_type());
  }
  return -1;
}

// Inputs: CUDA, contiguous. fp32 ones (decay, bonus, states, gradients) checked as such.
void need(const torch::Tensor& t, const char* name, bool fp32 = false) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  if (fp32) TORCH_CHECK(t.scalar_type() == torch::kFloat32, name, " must be float32");
}

const float* f(const torch::Tensor& t) { return t.numel() ? t.data_ptr<float>() : nullptr; }
float* fm(torch::Tensor& t) { return t.numel() ? t.data_ptr<float>() : nullptr; }

void check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "rwkv_zoo cuda ", what, ": ", cudaGetErrorString(err),
              err == cudaErrorInvalidValue ? " (no kernel built for this dtype or head size)" : "");
}

cudaStream_t stream() { return at::cuda::getCurrentCUDAStream().stream(); }

void wkv4_fwd(torch::Tensor w, torch::Tensor u, torch::Tensor k, torch::Tensor v, torch::Tensor a0, torch::Tensor b0,
              torch::Tensor p0, torch::Tensor y, torch::Tensor aT, torch::Tensor bT, torch::Tensor pT,
              torch::Tensor sa, torch::Tensor sb, torch::Tensor sp, bool save) {
  need(k, "k"); need(v, "v"); need(y, "y");
  for (auto* t : {&w, &u, &a0, &b0, &p0, &aT, &bT, &pT}) need(*t, "wkv4 fp32 tensor", true);
  TORCH_CHECK(v.scalar_type() == k.scalar_type() && y.scalar_type() == k.scalar_type(), "k, v, y dtypes differ");
  if (save) for (auto* t : {&sa, &sb, &sp}) { need(*t, "wkv4 saved state", true); TORCH_CHECK(t->sizes() == k.sizes()); }
  const c10::cuda::CUDAGuard guard(k.device());
  const int B = k.size(0), T = k.size(1), C = k.size(2);
  check(rwkv_zoo_cuda::wkv4_forward(dtype_of(k), B, T, C, f(w), f(u), k.data_ptr(), v.data_ptr(), f(a0), f(b0), f(p0),
                                    y.data_ptr(), fm(aT), fm(bT), fm(pT), fm(sa), fm(sb), fm(sp), save, stream()),
        "wkv4 forward");
}

void wkv4_bwd(torch::Tensor w, torch::Tensor u, torch::Tensor k, torch::Tensor v, torch::Tensor sa, torch::Tensor sb,
              torch::Tensor sp, torch::Tensor dy, torch::Tensor daT, torch::Tensor dbT, torch::Tensor dpT,
              torch::Tensor dk, torch::Tensor dv, torch::Tensor dw, torch::Tensor du, torch::Tensor da0,
              torch::Tensor db0, torch::Tensor dp0) {
  need(k, "k"); need(v, "v");
  for (auto* t : {&w, &u, &sa, &sb, &sp, &dy, &daT, &dbT, &dpT, &dk, &dv, &dw, &du, &da0, &db0, &dp0})
    need(*t, "wkv4 fp32 tensor", true);
  const c10::cuda::CUDAGuard guard(k.device());
  const int B = k.size(0), T = k.size(1), C = k.size(2);
  check(rwkv_zoo_cuda::wkv4_backward(dtype_of(k), B, T, C, f(w), f(u), k.data_ptr(), v.data_ptr(), f(sa), f(sb), f(sp),
                                     f(dy), f(daT), f(dbT), f(dpT), fm(dk), fm(dv), fm(dw), fm(du), fm(da0), fm(db0),
                                     fm(dp0), stream()),
        "wkv4 backward");
}

void wkv6_fwd(torch::Tensor r, torch::Tensor k, torch::Tensor v, torch::Tensor w, int64_t w_sb, int64_t w_st,
              torch::Tensor u, torch::Tensor s0, torch::Tensor y, torch::Tensor sT) {
  for (auto* t : {&r, &k, &v, &y}) need(*t, "wkv6 activation");
  for (auto* t : {&w, &u, &s0, &sT}) need(*t, "wkv6 fp32 tensor", true);
  const c10::cuda::CUDAGuard guard(r.device());
  const int B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
  check(rwkv_zoo_cuda::wkv6_forward(dtype_of(r), B, T, H, N, r.data_ptr(), k.data_ptr(), v.data_ptr(), f(w), w_sb,
                                    w_st, f(u), f(s0), y.data_ptr(), fm(sT), stream()),
        "wkv6 forward");
}

void wkv6_bwd(torch::Tensor r, torch::Tensor k, torch::Tensor v, torch::Tensor w, int64_t w_sb, int64_t w_st,
              torch::Tensor u, torch::Tensor s0, torch::Tensor dy, torch::Tensor dsT, torch::Tensor dr,
              torch::Tensor dk, torch::Tensor dv, torch::Tensor dw, torch::Tensor du, torch::Tensor ds0,
              torch::Tensor ck) {
  for (auto* t : {&r, &k, &v}) need(*t, "wkv6 activation");
  for (auto* t : {&w, &u, &s0, &dy, &dsT, &dr, &dk, &dv, &dw, &du, &ds0, &ck}) need(*t, "wkv6 fp32 tensor", true);
  const c10::cuda::CUDAGuard guard(r.device());
  const int B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
  check(rwkv_zoo_cuda::wkv6_backward(dtype_of(r), B, T, H, N, r.data_ptr(), k.data_ptr(), v.data_ptr(), f(w), w_sb,
                                     w_st, f(u), f(s0), f(dy), f(dsT), fm(dr), fm(dk), fm(dv), fm(dw), fm(du), fm(ds0),
                                     fm(ck), stream()),
        "wkv6 backward");
}

void wkv7_fwd(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v, torch::Tensor a, torch::Tensor b,
              torch::Tensor s0, torch::Tensor y, torch::Tensor sT, torch::Tensor sa, torch::Tensor ck, bool save) {
  for (auto* t : {&r, &k, &v, &a, &b, &y}) need(*t, "wkv7 activation");
  for (auto* t : {&w, &s0, &sT}) need(*t, "wkv7 fp32 tensor", true);
  if (save) { need(sa, "sa", true); need(ck, "checkpoints", true); }
  const c10::cuda::CUDAGuard guard(r.device());
  const int B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
  check(rwkv_zoo_cuda::wkv7_forward(dtype_of(r), B, T, H, N, r.data_ptr(), f(w), k.data_ptr(), v.data_ptr(),
                                    a.data_ptr(), b.data_ptr(), f(s0), y.data_ptr(), fm(sT), fm(sa), fm(ck), save,
                                    stream()),
        "wkv7 forward");
}

void wkv7_bwd(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v, torch::Tensor a, torch::Tensor b,
              torch::Tensor sa, torch::Tensor ck, torch::Tensor sT, torch::Tensor dy, torch::Tensor dsT,
              torch::Tensor dr, torch::Tensor dw, torch::Tensor dk, torch::Tensor dv, torch::Tensor da,
              torch::Tensor db, torch::Tensor ds0) {
  for (auto* t : {&r, &k, &v, &a, &b}) need(*t, "wkv7 activation");
  for (auto* t : {&w, &sa, &ck, &sT, &dy, &dsT, &dr, &dw, &dk, &dv, &da, &db, &ds0}) need(*t, "wkv7 fp32 tensor", true);
  const c10::cuda::CUDAGuard guard(r.device());
  const int B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
  check(rwkv_zoo_cuda::wkv7_backward(dtype_of(r), B, T, H, N, r.data_ptr(), f(w), k.data_ptr(), v.data_ptr(),
                                     a.data_ptr(), b.data_ptr(), f(sa), f(ck), f(sT), f(dy), f(dsT), fm(dr), fm(dw),
                                     fm(dk), fm(dv), fm(da), fm(db), fm(ds0), stream()),
        "wkv7 backward");
}

void wkv7_chunk_fwd(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v, torch::Tensor a,
                    torch::Tensor b, torch::Tensor s0, torch::Tensor y, torch::Tensor sT, torch::Tensor ck) {
  for (auto* t : {&r, &k, &v, &a, &b, &y}) need(*t, "wkv7 activation");
  for (auto* t : {&w, &s0, &sT}) need(*t, "wkv7 fp32 tensor", true);
  if (ck.numel()) need(ck, "chunk states", true);
  const c10::cuda::CUDAGuard guard(r.device());
  const int B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
  check(rwkv_zoo_cuda::wkv7_chunk_forward(dtype_of(r), B, T, H, N, r.data_ptr(), f(w), k.data_ptr(), v.data_ptr(),
                                          a.data_ptr(), b.data_ptr(), f(s0), y.data_ptr(), fm(sT), fm(ck), stream()),
        "wkv7 chunk forward");
}

void wkv7_chunk_bwd(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v, torch::Tensor a,
                    torch::Tensor b, torch::Tensor ck, torch::Tensor dy, torch::Tensor dsT, torch::Tensor dr,
                    torch::Tensor dw, torch::Tensor dk, torch::Tensor dv, torch::Tensor da, torch::Tensor db,
                    torch::Tensor ds0) {
  for (auto* t : {&r, &k, &v, &a, &b}) need(*t, "wkv7 activation");
  for (auto* t : {&w, &ck, &dy, &dsT, &dr, &dw, &dk, &dv, &da, &db, &ds0}) need(*t, "wkv7 fp32 tensor", true);
  const c10::cuda::CUDAGuard guard(r.device());
  const int B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
  check(rwkv_zoo_cuda::wkv7_chunk_backward(dtype_of(r), B, T, H, N, r.data_ptr(), f(w), k.data_ptr(), v.data_ptr(),
                                           a.data_ptr(), b.data_ptr(), f(ck), f(dy), f(dsT), fm(dr), fm(dw), fm(dk),
                                           fm(dv), fm(da), fm(db), fm(ds0), stream()),
        "wkv7 chunk backward");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rwkv_zoo CUDA WKV kernels (outputs preallocated by the caller)";
  m.def("wkv4_fwd", &wkv4_fwd);
  m.def("wkv4_bwd", &wkv4_bwd);
  m.def("wkv6_fwd", &wkv6_fwd);
  m.def("wkv6_bwd", &wkv6_bwd);
  m.def("wkv7_fwd", &wkv7_fwd);
  m.def("wkv7_bwd", &wkv7_bwd);
  m.def("wkv7_chunk_fwd", &wkv7_chunk_fwd);
  m.def("wkv7_chunk_bwd", &wkv7_chunk_bwd);
}
