// The real kernel files (wkv4.cu, wkv6.cu, wkv7.cu, wkv7_chunk.cu without its tensor-core calls), fp32, compiled with g++ and run with a CPU thread
// per CUDA thread (host_threads.h). Entry points have the CPU emulator's signatures (emulate.cpp), so
// the Python side (emulate.py) drives either. Build: g++ -std=c++20 -O1 -pthread -DRWKV_HOST_THREADS.
#define RWKV_HOST_THREADS 1
#include "wkv4.cu"
#include "wkv6.cu"
#include "wkv7.cu"
#include "wkv7_chunk.cu"

using namespace rwkv_zoo_cuda;

#define RWKV_HOST_SWITCH(N, CALL)                               \
  switch (N) {                                                  \
    case 32: { constexpr int NN = 32; CALL; } return 0;         \
    case 64: { constexpr int NN = 64; CALL; } return 0;         \
    default: return 1;                                          \
  }

extern "C" {

int emu_wkv6_fwd(int B, int T, int H, int N, const float* r, const float* k, const float* v, const float* w,
                 long wsb, long wst, const float* u, const float* s0, float* y, float* sT) {
  RWKV_HOST_SWITCH(N, rwkv_host_launch(B * H, NN, [&] {
    wkv6_fwd_kernel<float, NN>(T, H, r, k, v, w, wsb, wst, u, s0, y, sT);
  }))
}

int emu_wkv6_bwd(int B, int T, int H, int N, const float* r, const float* k, const float* v, const float* w,
                 long wsb, long wst, const float* u, const float* s0, const float* dy, const float* dsT, float* dr,
                 float* dk, float* dv, float* dw, float* du, float* ds0) {
  std::vector<float> ck((size_t)B * H * ((T + WKV6_CK - 1) / WKV6_CK) * N * N);
  RWKV_HOST_SWITCH(N, rwkv_host_launch(B * H, NN, [&] {
    wkv6_bwd_kernel<float, NN>(T, H, r, k, v, w, wsb, wst, u, s0, dy, dsT, dr, dk, dv, dw, du, ds0, ck.data());
  }))
}

int emu_wkv7_fwd(int B, int T, int H, int N, const float* r, const float* w, const float* k, const float* v,
                 const float* a, const float* b, const float* s0, float* y, float* sT, float* sa, float* ck,
                 int save) {
  RWKV_HOST_SWITCH(N, rwkv_host_launch(B * H, NN, [&] {
    wkv7_fwd_kernel<float, NN>(T, H, r, w, k, v, a, b, s0, y, sT, sa, ck, save != 0);
  }))
}

int emu_wkv7_bwd(int B, int T, int H, int N, const float* r, const float* w, const float* k, const float* v,
                 const float* a, const float* b, const float* sa, const float* ck, const float* sT, const float* dy,
                 const float* dsT, float* dr, float* dw, float* dk, float* dv, float* da, float* db, float* ds0) {
  RWKV_HOST_SWITCH(N, rwkv_host_launch(B * H, NN, [&] {
    wkv7_bwd_kernel<float, NN>(T, H, r, w, k, v, a, b, sa, ck, sT, dy, dsT, dr, dw, dk, dv, da, db, ds0);
  }))
}

int emu_wkv4_fwd(int B, int T, int C, const float* w, const float* u, const float* k, const float* v,
                 const float* a0, const float* b0, const float* p0, float* y, float* aT, float* bT, float* pT,
                 float* sa, float* sb, float* sp, int save) {
  const unsigned threads = 128, blocks = (unsigned)(((long)B * C + threads - 1) / threads);
  rwkv_host_launch(blocks, threads, [&] {
    wkv4_fwd_kernel<float>(B, T, C, w, u, k, v, a0, b0, p0, y, aT, bT, pT, sa, sb, sp, save != 0);
  });
  return 0;
}

int emu_wkv4_bwd(int B, int T, int C, const float* w, const float* u, const float* k, const float* v,
                 const float* sa, const float* sb, const float* sp, const float* dy, const float* daT,
                 const float* dbT, const float* dpT, float* dk, float* dv, float* dw, float* du, float* da0,
                 float* db0, float* dp0) {
  const unsigned threads = 128, blocks = (unsigned)(((long)B * C + threads - 1) / threads);
  rwkv_host_launch(blocks, threads, [&] {
    wkv4_bwd_kernel<float>(B, T, C, w, u, k, v, sa, sb, sp, dy, daT, dbT, dpT, dk, dv, dw, du, da0, db0, dp0);
  });
  return 0;
}

// The chunk kernel with its two tensor-core phases replaced by loops (see wkv7_chunk.cu).
int emu_wkv7_chunk_fwd(int B, int T, int H, int N, const float* r, const float* w, const float* k, const float* v,
                       const float* a, const float* b, const float* s0, float* y, float* sT, float* ck) {
  RWKV_HOST_SWITCH(N, rwkv_host_launch(B * H, C7_THREADS, [&] {
    wkv7_chunk_fwd_kernel<float, NN>(T, H, r, w, k, v, a, b, s0, y, sT, ck);
  }))
}

int emu_wkv7_chunk_bwd(int B, int T, int H, int N, const float* r, const float* w, const float* k, const float* v,
                       const float* a, const float* b, const float* ck, const float* dy, const float* dsT, float* dr,
                       float* dw, float* dk, float* dv, float* da, float* db, float* ds0) {
  RWKV_HOST_SWITCH(N, rwkv_host_launch(B * H, C7_THREADS, [&] {
    wkv7_chunk_bwd_kernel<float, NN>(T, H, r, w, k, v, a, b, ck, dy, dsT, dr, dw, dk, dv, da, db, ds0);
  }))
}

}  // extern "C"
