// Helpers shared by the CPU kernels (labpal_ops.cpp) and the CUDA glue (cuda/cuda_ops.cpp).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <vector>

namespace labpal_fast {

inline at::ScalarType acc_type(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

inline void check_flat(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t numel,
                const at::Tensor& like) {
  TORCH_CHECK(t.is_contiguous(), "labpal_fast: ", name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == dtype, "labpal_fast: ", name, " has dtype ", t.scalar_type(),
              ", expected ", dtype);
  TORCH_CHECK(t.numel() == numel, "labpal_fast: ", name, " has ", t.numel(), " elements, expected ",
              numel);
  TORCH_CHECK(t.device() == like.device(), "labpal_fast: ", name, " is on ", t.device(),
              ", expected ", like.device());
}

inline void check_param(const at::Tensor& param) {
  auto t = param.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
              "labpal_fast: parameters must be float32/float64/float16/bfloat16, got ", t);
  TORCH_CHECK(param.is_contiguous(), "labpal_fast: param must be contiguous");
}

// A run of the flat buffer with one weight decay.
struct Segment { int64_t start, end; double wd; };

// The segments (starts, ends, decays), sorted and completed to cover [0, n); gaps get wd = 0.
inline std::vector<Segment> cover_segments(int64_t n, c10::ArrayRef<int64_t> starts,
                                           c10::ArrayRef<int64_t> ends,
                                           c10::ArrayRef<double> decays) {
  TORCH_CHECK(starts.size() == ends.size() && starts.size() == decays.size(),
              "labpal_fast: seg_starts, seg_ends and decays must have the same length");
  std::vector<Segment> segs;
  for (size_t k = 0; k < starts.size(); ++k) {
    TORCH_CHECK(0 <= starts[k] && starts[k] <= ends[k] && ends[k] <= n,
                "labpal_fast: segment ", k, " [", starts[k], ", ", ends[k], ") is outside [0, ", n, ")");
    if (starts[k] < ends[k]) segs.push_back({starts[k], ends[k], decays[k]});
  }
  std::sort(segs.begin(), segs.end(), [](const Segment& x, const Segment& y) { return x.start < y.start; });
  std::vector<Segment> segments;  // covers [0, n): gaps between segments have no weight decay
  int64_t at = 0;
  for (const Segment& s : segs) {
    TORCH_CHECK(s.start >= at, "labpal_fast: segments overlap at ", s.start);
    if (s.start > at) segments.push_back({at, s.start, 0.0});
    segments.push_back(s);
    at = s.end;
  }
  if (at < n) segments.push_back({at, n, 0.0});
  return segments;
}

}  // namespace labpal_fast
