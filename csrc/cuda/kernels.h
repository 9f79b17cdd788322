// Launchers of the CUDA kernels (kernels.cu). Plain C++ and the CUDA runtime only, no torch
// headers, so that `nvcc -c kernels.cu` works on a machine without torch or a GPU; the torch
// glue (checks, dtypes, streams, workspaces) is in cuda_ops.cpp.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace labpal_fast {
namespace cuda {

enum DType : int { F32 = 0, F64 = 1, F16 = 2, BF16 = 3 };

constexpr int MAX_SEGMENTS = 64;          // weight-decay runs passed by value to form_direction
constexpr int64_t DIR_BLOCK = 4096;     // reduction grid: elements per block (fixed)

// Runs of the flat buffer with one weight decay, covering [0, n) in order.
struct Segments {
  int count;
  int64_t start[MAX_SEGMENTS];
  int64_t end[MAX_SEGMENTS];
  double wd[MAX_SEGMENTS];
};

// Blocks of form_direction's first stage; its workspace holds 5 doubles per block.
int64_t form_direction_blocks(int64_t n);

// grad_sum (+)= grad; grad = 0.  grad_sum in the accumulation dtype (fp32 for F16 / BF16).
cudaError_t accumulate(void* grad_sum, void* grad, int64_t n, DType dtype, bool first,
                       cudaStream_t stream);

// ḡ = c·(grad_sum + grad)·inv_m (grad_sum may be null: ḡ = c·grad) + wd·θ;  d = β·d + ḡ;
// grad = 0; c = *scale (a device scalar: clipping), or 1 when scale is null.
// out[5] (fp64, device) = ‖d‖², and with `terms` ⟨ḡ,d⟩ (ḡ unclipped), Σwd‖d‖², Σwd⟨θ,d⟩,
// Σwd‖θ‖² (else 0). work: 5·form_direction_blocks(n) doubles. Two launches, no atomics.
cudaError_t form_direction(void* direction, void* grad, const void* grad_sum, const void* param,
                           const Segments& segments, int64_t n, DType dtype, double inv_m,
                           double momentum, bool terms, const double* scale, double* work,
                           double* out, cudaStream_t stream);

// *out (fp64, device) = ‖ḡ‖², ḡ = (grad_sum + grad)·inv_m (grad_sum may be null: ḡ = grad).
// work: form_direction_blocks(n) doubles. Two launches, no atomics: deterministic.
cudaError_t grad_sqnorm(const void* grad, const void* grad_sum, int64_t n, DType dtype,
                        double inv_m, double* work, double* out, cudaStream_t stream);

// *ok: θ += (*coef)·d;  else d = 0 (θ += coef·0).  coef, ok: device scalars.
cudaError_t train_update(void* param, void* direction, const double* coef, const bool* ok,
                         int64_t n, DType dtype, cudaStream_t stream);

// θ = θ₀ + (*coef)·d, θ₀ (origin) in the accumulation dtype.
cudaError_t line_move(void* param, const void* origin, const void* direction, const double* coef,
                      int64_t n, DType dtype, cudaStream_t stream);

}  // namespace cuda
}  // namespace labpal_fast
