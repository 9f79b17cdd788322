// The torch glue of the CUDA kernels: checks, dtype codes, streams and workspaces, and the
// CUDA registrations of the labpal_fast ops (schemas in ../labpal_ops.cpp). Built only when
// setup.py finds a CUDA build of torch and a CUDA toolkit.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../common.h"
#include "kernels.h"

namespace labpal_fast {
namespace {

cuda::DType dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::F32;
    case at::kDouble: return cuda::F64;
    case at::kHalf: return cuda::F16;
    case at::kBFloat16: return cuda::BF16;
    default: TORCH_CHECK(false, "labpal_fast: unsupported dtype ", t);
  }
}

void check(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "labpal_fast::", op, ": CUDA error: ", cudaGetErrorString(err));
}

// A device scalar as the kernels want it (a device-side cast when it is not already so).
at::Tensor device_scalar(const at::Tensor& t, at::ScalarType dtype, const at::Tensor& like,
                         const char* name) {
  TORCH_CHECK(t.numel() == 1, "labpal_fast: ", name, " must hold one value");
  return t.to(like.device(), dtype, /*non_blocking=*/true).contiguous();
}

void accumulate_cuda(at::Tensor grad_sum, at::Tensor grad, bool first) {
  check_param(grad);
  check_flat(grad_sum, "grad_sum", acc_type(grad.scalar_type()), grad.numel(), grad);
  const c10::cuda::CUDAGuard guard(grad.device());
  check(cuda::accumulate(grad_sum.data_ptr(), grad.data_ptr(), grad.numel(),
                         dtype_code(grad.scalar_type()), first,
                         c10::cuda::getCurrentCUDAStream().stream()),
        "accumulate");
}

at::Tensor form_direction_cuda(at::Tensor direction, at::Tensor grad,
                               const c10::optional<at::Tensor>& grad_sum, const at::Tensor& param,
                               c10::ArrayRef<int64_t> seg_starts, c10::ArrayRef<int64_t> seg_ends,
                               c10::ArrayRef<double> decays, double inv_m, double momentum,
                               bool line_terms, const c10::optional<at::Tensor>& grad_scale) {
  check_param(param);
  const int64_t n = param.numel();
  const auto acc = acc_type(param.scalar_type());
  check_flat(grad, "grad", param.scalar_type(), n, param);
  check_flat(direction, "direction", acc, n, param);
  const bool summed = grad_sum.has_value() && grad_sum->defined();
  if (summed) check_flat(*grad_sum, "grad_sum", acc, n, param);
  // merge neighbouring runs of equal weight decay, then pass them by value
  std::vector<Segment> merged;
  for (const Segment& p : cover_segments(n, seg_starts, seg_ends, decays)) {
    if (!merged.empty() && merged.back().wd == p.wd && merged.back().end == p.start)
      merged.back().end = p.end;
    else
      merged.push_back(p);
  }
  if (merged.empty()) merged.push_back({0, n, 0.0});
  TORCH_CHECK(merged.size() <= static_cast<size_t>(cuda::MAX_SEGMENTS),
              "labpal_fast::form_direction on CUDA supports at most ", cuda::MAX_SEGMENTS,
              " runs of distinct weight decay, got ", merged.size());
  cuda::Segments segments{};
  segments.count = static_cast<int>(merged.size());
  for (size_t k = 0; k < merged.size(); ++k) {
    segments.start[k] = merged[k].start;
    segments.end[k] = merged[k].end;
    segments.wd[k] = merged[k].wd;
  }
  const c10::cuda::CUDAGuard guard(param.device());
  const auto f64 = param.options().dtype(at::kDouble);
  at::Tensor scale;
  if (grad_scale.has_value() && grad_scale->defined())
    scale = device_scalar(*grad_scale, at::kDouble, param, "grad_scale");
  at::Tensor work = at::empty({cuda::form_direction_blocks(n) * 5}, f64);
  at::Tensor out = at::empty({5}, f64);
  check(cuda::form_direction(direction.data_ptr(), grad.data_ptr(),
                             summed ? grad_sum->const_data_ptr() : nullptr, param.const_data_ptr(),
                             segments, n, dtype_code(param.scalar_type()), inv_m, momentum,
                             line_terms, scale.defined() ? scale.const_data_ptr<double>() : nullptr,
                             work.data_ptr<double>(), out.data_ptr<double>(),
                             c10::cuda::getCurrentCUDAStream().stream()),
        "form_direction");
  return out;
}

at::Tensor grad_sqnorm_cuda(const at::Tensor& grad, const c10::optional<at::Tensor>& grad_sum,
                            double inv_m) {
  check_param(grad);
  const int64_t n = grad.numel();
  const bool summed = grad_sum.has_value() && grad_sum->defined();
  if (summed) check_flat(*grad_sum, "grad_sum", acc_type(grad.scalar_type()), n, grad);
  const c10::cuda::CUDAGuard guard(grad.device());
  const auto f64 = grad.options().dtype(at::kDouble);
  at::Tensor work = at::empty({cuda::form_direction_blocks(n)}, f64);
  at::Tensor out = at::zeros({}, f64);
  if (n == 0) return out;
  check(cuda::grad_sqnorm(grad.const_data_ptr(), summed ? grad_sum->const_data_ptr() : nullptr,
                          n, dtype_code(grad.scalar_type()), inv_m, work.data_ptr<double>(),
                          out.data_ptr<double>(), c10::cuda::getCurrentCUDAStream().stream()),
        "grad_sqnorm");
  return out;
}

void train_update_cuda(at::Tensor param, at::Tensor direction, const at::Tensor& coef,
                       const at::Tensor& ok) {
  check_param(param);
  check_flat(direction, "direction", acc_type(param.scalar_type()), param.numel(), param);
  const c10::cuda::CUDAGuard guard(param.device());
  const at::Tensor c = device_scalar(coef, at::kDouble, param, "coef");
  const at::Tensor k = device_scalar(ok, at::kBool, param, "ok");
  check(cuda::train_update(param.data_ptr(), direction.data_ptr(), c.const_data_ptr<double>(),
                           k.const_data_ptr<bool>(), param.numel(),
                           dtype_code(param.scalar_type()), c10::cuda::getCurrentCUDAStream().stream()),
        "train_update");
}

void line_move_cuda(at::Tensor param, const at::Tensor& origin, const at::Tensor& direction,
                    const at::Tensor& coef) {
  check_param(param);
  const auto acc = acc_type(param.scalar_type());
  check_flat(origin, "origin", acc, param.numel(), param);
  check_flat(direction, "direction", acc, param.numel(), param);
  const c10::cuda::CUDAGuard guard(param.device());
  const at::Tensor c = device_scalar(coef, at::kDouble, param, "coef");
  check(cuda::line_move(param.data_ptr(), origin.const_data_ptr(), direction.const_data_ptr(),
                        c.const_data_ptr<double>(), param.numel(),
                        dtype_code(param.scalar_type()), c10::cuda::getCurrentCUDAStream().stream()),
        "line_move");
}

}  // namespace

TORCH_LIBRARY_IMPL(labpal_fast, CUDA, m) {
  m.impl("accumulate", &accumulate_cuda);
  m.impl("grad_sqnorm", &grad_sqnorm_cuda);
  m.impl("form_direction", &form_direction_cuda);
  m.impl("train_update", &train_update_cuda);
  m.impl("line_move", &line_move_cuda);
}

}  // namespace labpal_fast
