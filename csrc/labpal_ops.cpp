// The LABPAL op set as custom operators in the `labpal_fast` namespace: the schemas, the CPU
// kernels (one pass over memory per op) and the Python module `labpal_fast._C` that loads them.
// Semantics are those of labpal_fast/ops/eager.py; the CUDA kernels live in csrc/cuda/.
//
// Buffers are flat and contiguous: param / grad in the parameter dtype P, direction /
// grad_sum / origin in the accumulation dtype A (fp32 for fp16 / bf16, else P).
// Reductions are deterministic: a fixed grid of BLOCK-element blocks (independent of the
// thread count), fp64 partial sums per block, added in block order.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

namespace labpal_fast {
namespace {

constexpr int64_t BLOCK = 4096;        // reduction grid: elements per block (fixed)
constexpr int64_t GRAIN = 32768;       // elementwise ops: elements per task, at least
constexpr int64_t BLOCK_GRAIN = GRAIN / BLOCK;

template <typename T> struct Acc { using type = T; };
template <> struct Acc<c10::Half> { using type = float; };
template <> struct Acc<c10::BFloat16> { using type = float; };

// The value of a 0-dim (or one-element) CPU tensor, as a double / bool.
double cpu_scalar(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.numel() == 1, "labpal_fast: ", name, " must hold one value");
  TORCH_CHECK(t.device().is_cpu(), "labpal_fast: ", name, " must be on the CPU for CPU parameters");
  double v = 0;
  AT_DISPATCH_ALL_TYPES_AND3(at::kHalf, at::kBFloat16, at::kBool, t.scalar_type(), "cpu_scalar",
                             [&] { v = static_cast<double>(*t.const_data_ptr<scalar_t>()); });
  return v;
}

// ---------------------------------------------------------------------------- accumulate
// grad_sum (+)= grad; grad = 0.
void accumulate_cpu(at::Tensor grad_sum, at::Tensor grad, bool first) {
  check_param(grad);
  const int64_t n = grad.numel();
  check_flat(grad_sum, "grad_sum", acc_type(grad.scalar_type()), n, grad);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "accumulate", [&] {
    using P = scalar_t;
    using A = typename Acc<P>::type;
    A* __restrict__ s = grad_sum.data_ptr<A>();
    P* __restrict__ g = grad.data_ptr<P>();
    at::parallel_for(0, n, GRAIN, [&](int64_t b, int64_t e) {
      if (first) {
        for (int64_t i = b; i < e; ++i) { s[i] = static_cast<A>(g[i]); g[i] = P(0); }
      } else {
        for (int64_t i = b; i < e; ++i) { s[i] = s[i] + static_cast<A>(g[i]); g[i] = P(0); }
      }
    });
  });
}

// ---------------------------------------------------------------------------- form_direction
// ḡ = c·(grad_sum + grad)·inv_m (or c·grad) + wd·θ per segment;  d = β·d + ḡ;  grad = 0;
// c = *grad_scale (clipping) or 1. Returns fp64[5]: ‖d‖², ⟨ḡ,d⟩ (ḡ unclipped: the objective's
// slope), Σ wd‖d‖², Σ wd⟨θ,d⟩, Σ wd‖θ‖² (the last four with line_terms).

// 16-byte vectors of the accumulation type (GCC / Clang vector extensions): 4 floats or 2
// doubles; SSE2 / NEON without -march, and vector code whatever the auto-vectorizer decides.
template <typename A> struct Vec {
  typedef A type __attribute__((vector_size(16)));
  static constexpr int W = 16 / sizeof(A);
};

template <typename A, typename P>
__attribute__((always_inline)) inline typename Vec<A>::type load_vec(const P* p) {
  typename Vec<A>::type v;
  if constexpr (std::is_same_v<A, P>) {
    std::memcpy(&v, p, sizeof(v));
  } else {
    for (int j = 0; j < Vec<A>::W; ++j) v[j] = static_cast<A>(p[j]);
  }
  return v;
}

template <typename A, typename P>
__attribute__((always_inline)) inline void store_vec(P* p, typename Vec<A>::type v) {
  if constexpr (std::is_same_v<A, P>) {
    std::memcpy(p, &v, sizeof(v));
  } else {
    for (int j = 0; j < Vec<A>::W; ++j) p[j] = static_cast<P>(v[j]);
  }
}

// [a, b) of one block, one weight decay: the fused pass. Adds its unweighted sums to
// r = [Σd², Σḡd, (unused), Σθd, Σθ²], in a fixed order (U·W accumulator lanes, then the tail).
template <typename P, typename A, bool SUMMED, bool MOM, bool WD, bool TERMS>
__attribute__((noinline)) void direction_range(A* __restrict__ d, P* __restrict__ grad,
                                               const A* __restrict__ gs, const P* __restrict__ th,
                                               int64_t a, int64_t b, A inv_m, A beta, A wd,
                                               A scale, double* r) {
  using V = typename Vec<A>::type;
  constexpr int W = Vec<A>::W;
  constexpr int U = 2;  // independent accumulators: no add-latency chain
  V sdd[U] = {}, sgd[U] = {}, std_[U] = {}, stt[U] = {};
  const V zero = {};
  auto step = [&](int64_t i, int u) __attribute__((always_inline)) {
    V g = load_vec<A>(grad + i);
    if constexpr (SUMMED) g = (load_vec<A>(gs + i) + g) * inv_m;
    V go = g;  // the objective's gradient, for ⟨ḡ, d⟩ (= g unless clipping: scale·1 is exact)
    g = g * scale;
    V t = {};
    if constexpr (WD) {
      t = load_vec<A>(th + i);
      g = g + wd * t;
      if constexpr (TERMS) go = go + wd * t;
    }
    V dn = g;
    if constexpr (MOM) dn = g + beta * load_vec<A>(d + i);
    store_vec<A>(d + i, dn);
    store_vec<A>(grad + i, zero);
    sdd[u] += dn * dn;
    if constexpr (TERMS) {
      sgd[u] += go * dn;
      if constexpr (WD) { std_[u] += t * dn; stt[u] += t * t; }
    }
  };
  int64_t i = a;
  for (; i + U * W <= b; i += U * W) {
    step(i, 0);
    step(i + W, 1);
  }
  double s[5] = {0, 0, 0, 0, 0};
  for (int u = 0; u < U; ++u) {
    for (int j = 0; j < W; ++j) {
      s[0] += sdd[u][j];
      s[1] += sgd[u][j];
      s[3] += std_[u][j];
      s[4] += stt[u][j];
    }
  }
  for (; i < b; ++i) {  // the tail, one element at a time
    A g = static_cast<A>(grad[i]);
    if constexpr (SUMMED) g = (gs[i] + g) * inv_m;
    A go = g;
    g = g * scale;
    A t = A(0);
    if constexpr (WD) {
      t = static_cast<A>(th[i]);
      g = g + wd * t;
      if constexpr (TERMS) go = go + wd * t;
    }
    A dn = g;
    if constexpr (MOM) dn = g + beta * d[i];
    d[i] = dn;
    grad[i] = P(0);
    s[0] += static_cast<double>(dn) * dn;
    if constexpr (TERMS) {
      s[1] += static_cast<double>(go) * dn;
      if constexpr (WD) { s[3] += static_cast<double>(t) * dn; s[4] += static_cast<double>(t) * t; }
    }
  }
  for (int k = 0; k < 5; ++k) r[k] += s[k];
}

template <typename P, typename A, bool SUMMED, bool MOM, bool TERMS>
void direction_blocks(A* d, P* grad, const A* gs, const P* th, const std::vector<Segment>& segments,
                      int64_t n, A inv_m, A beta, A scale, double* out) {
  const int64_t blocks = (n + BLOCK - 1) / BLOCK;
  std::vector<double> part(static_cast<size_t>(blocks) * 5, 0.0);
  at::parallel_for(0, blocks, BLOCK_GRAIN, [&](int64_t cb, int64_t ce) {
    size_t p = 0;
    for (int64_t c = cb; c < ce; ++c) {
      const int64_t c0 = c * BLOCK, c1 = std::min(n, c0 + BLOCK);
      double* r = &part[static_cast<size_t>(c) * 5];
      while (p < segments.size() && segments[p].end <= c0) ++p;
      for (size_t q = p; q < segments.size() && segments[q].start < c1; ++q) {
        const int64_t a = std::max(c0, segments[q].start), b = std::min(c1, segments[q].end);
        if (a >= b) continue;
        const double wd = segments[q].wd;
        double s[5] = {0, 0, 0, 0, 0};
        if (wd != 0.0) {
          direction_range<P, A, SUMMED, MOM, true, TERMS>(d, grad, gs, th, a, b, inv_m, beta,
                                                          static_cast<A>(wd), scale, s);
        } else {
          direction_range<P, A, SUMMED, MOM, false, TERMS>(d, grad, gs, th, a, b, inv_m, beta,
                                                           A(0), scale, s);
        }
        r[0] += s[0];
        if (TERMS) {
          r[1] += s[1];
          if (wd != 0.0) { r[2] += wd * s[0]; r[3] += wd * s[3]; r[4] += wd * s[4]; }
        }
      }
    }
  });
  for (int64_t c = 0; c < blocks; ++c)  // fixed order: deterministic whatever the threads
    for (int k = 0; k < 5; ++k) out[k] += part[static_cast<size_t>(c) * 5 + k];
}

template <typename P, typename A>
void direction_dispatch(bool summed, bool mom, bool terms, A* d, P* g, const A* gs, const P* th,
                        const std::vector<Segment>& segments, int64_t n, A inv_m, A beta,
                        A scale, double* o) {
#define LABPAL_DIR(S, M, T) \
  direction_blocks<P, A, S, M, T>(d, g, gs, th, segments, n, inv_m, beta, scale, o)
  switch ((summed ? 4 : 0) + (mom ? 2 : 0) + (terms ? 1 : 0)) {
    case 0: LABPAL_DIR(false, false, false); break;
    case 1: LABPAL_DIR(false, false, true); break;
    case 2: LABPAL_DIR(false, true, false); break;
    case 3: LABPAL_DIR(false, true, true); break;
    case 4: LABPAL_DIR(true, false, false); break;
    case 5: LABPAL_DIR(true, false, true); break;
    case 6: LABPAL_DIR(true, true, false); break;
    default: LABPAL_DIR(true, true, true); break;
  }
#undef LABPAL_DIR
}

at::Tensor form_direction_cpu(at::Tensor direction, at::Tensor grad, const c10::optional<at::Tensor>& grad_sum,
                              const at::Tensor& param, c10::ArrayRef<int64_t> seg_starts,
                              c10::ArrayRef<int64_t> seg_ends, c10::ArrayRef<double> decays,
                              double inv_m, double momentum, bool line_terms,
                              const c10::optional<at::Tensor>& grad_scale) {
  check_param(param);
  const int64_t n = param.numel();
  const auto acc = acc_type(param.scalar_type());
  check_flat(grad, "grad", param.scalar_type(), n, param);
  check_flat(direction, "direction", acc, n, param);
  const bool summed = grad_sum.has_value() && grad_sum->defined();
  if (summed) check_flat(*grad_sum, "grad_sum", acc, n, param);
  const auto segments = cover_segments(n, seg_starts, seg_ends, decays);
  const double scale = grad_scale.has_value() && grad_scale->defined()
                           ? cpu_scalar(*grad_scale, "grad_scale") : 1.0;
  at::Tensor out = at::zeros({5}, param.options().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "form_direction", [&] {
    using P = scalar_t;
    using A = typename Acc<P>::type;
    A* d = direction.data_ptr<A>();
    P* g = grad.data_ptr<P>();
    const A* gs = summed ? grad_sum->const_data_ptr<A>() : nullptr;
    const P* th = param.const_data_ptr<P>();
    direction_dispatch<P, A>(summed, momentum != 0.0, line_terms, d, g, gs, th, segments, n,
                             static_cast<A>(inv_m), static_cast<A>(momentum),
                             static_cast<A>(scale), o);
  });
  return out;
}

// ---------------------------------------------------------------------------- grad_sqnorm
// ‖ḡ‖², ḡ = (grad_sum + grad)·inv_m (or grad) formed as form_direction forms it; fp64, 0-dim.
template <typename P, typename A, bool SUMMED>
double sqnorm_range(const P* __restrict__ grad, const A* __restrict__ gs, int64_t a, int64_t b,
                    A inv_m) {
  using V = typename Vec<A>::type;
  constexpr int W = Vec<A>::W;
  constexpr int U = 2;
  V acc[U] = {};
  int64_t i = a;
  for (; i + U * W <= b; i += U * W) {
    for (int u = 0; u < U; ++u) {
      V g = load_vec<A>(grad + i + u * W);
      if constexpr (SUMMED) g = (load_vec<A>(gs + i + u * W) + g) * inv_m;
      acc[u] += g * g;
    }
  }
  double s = 0;
  for (int u = 0; u < U; ++u)
    for (int j = 0; j < W; ++j) s += acc[u][j];
  for (; i < b; ++i) {
    A g = static_cast<A>(grad[i]);
    if constexpr (SUMMED) g = (gs[i] + g) * inv_m;
    s += static_cast<double>(g) * g;
  }
  return s;
}

template <typename P, typename A, bool SUMMED>
double sqnorm_blocks(const P* grad, const A* gs, int64_t n, A inv_m) {
  const int64_t blocks = (n + BLOCK - 1) / BLOCK;
  std::vector<double> part(static_cast<size_t>(blocks), 0.0);
  at::parallel_for(0, blocks, BLOCK_GRAIN, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c)
      part[c] = sqnorm_range<P, A, SUMMED>(grad, gs, c * BLOCK, std::min(n, (c + 1) * BLOCK), inv_m);
  });
  double s = 0;
  for (int64_t c = 0; c < blocks; ++c) s += part[c];  // fixed order: deterministic
  return s;
}

at::Tensor grad_sqnorm_cpu(const at::Tensor& grad, const c10::optional<at::Tensor>& grad_sum,
                           double inv_m) {
  check_param(grad);
  const int64_t n = grad.numel();
  const bool summed = grad_sum.has_value() && grad_sum->defined();
  if (summed) check_flat(*grad_sum, "grad_sum", acc_type(grad.scalar_type()), n, grad);
  double s = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "grad_sqnorm", [&] {
    using P = scalar_t;
    using A = typename Acc<P>::type;
    const P* g = grad.const_data_ptr<P>();
    if (summed) {
      s = sqnorm_blocks<P, A, true>(g, grad_sum->const_data_ptr<A>(), n, static_cast<A>(inv_m));
    } else {
      s = sqnorm_blocks<P, A, false>(g, nullptr, n, static_cast<A>(inv_m));
    }
  });
  return at::full({}, s, grad.options().dtype(at::kDouble));
}

// ---------------------------------------------------------------------------- train_update
// ok: θ += coef·d.  not ok (d not finite): d = 0, θ += coef·0.
void train_update_cpu(at::Tensor param, at::Tensor direction, const at::Tensor& coef,
                      const at::Tensor& ok) {
  check_param(param);
  const int64_t n = param.numel();
  check_flat(direction, "direction", acc_type(param.scalar_type()), n, param);
  const double c = cpu_scalar(coef, "coef");
  const bool fine = cpu_scalar(ok, "ok") != 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "train_update", [&] {
    using P = scalar_t;
    using A = typename Acc<P>::type;
    P* __restrict__ th = param.data_ptr<P>();
    A* __restrict__ d = direction.data_ptr<A>();
    const A ca = static_cast<A>(c);
    at::parallel_for(0, n, GRAIN, [&](int64_t b, int64_t e) {
      if (fine) {
        for (int64_t i = b; i < e; ++i) th[i] = static_cast<P>(static_cast<A>(th[i]) + ca * d[i]);
      } else {
        for (int64_t i = b; i < e; ++i) {
          d[i] = A(0);
          th[i] = static_cast<P>(static_cast<A>(th[i]) + ca * A(0));
        }
      }
    });
  });
}

// ---------------------------------------------------------------------------- line_move
// θ = θ₀ + coef·d, θ₀ (origin) in the accumulation dtype.
void line_move_cpu(at::Tensor param, const at::Tensor& origin, const at::Tensor& direction,
                   const at::Tensor& coef) {
  check_param(param);
  const int64_t n = param.numel();
  const auto acc = acc_type(param.scalar_type());
  check_flat(origin, "origin", acc, n, param);
  check_flat(direction, "direction", acc, n, param);
  const double c = cpu_scalar(coef, "coef");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "line_move", [&] {
    using P = scalar_t;
    using A = typename Acc<P>::type;
    P* __restrict__ th = param.data_ptr<P>();
    const A* __restrict__ o = origin.const_data_ptr<A>();
    const A* __restrict__ d = direction.const_data_ptr<A>();
    const A ca = static_cast<A>(c);
    at::parallel_for(0, n, GRAIN, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) th[i] = static_cast<P>(o[i] + ca * d[i]);
    });
  });
}

}  // namespace

TORCH_LIBRARY(labpal_fast, m) {
  m.def("accumulate(Tensor(a!) grad_sum, Tensor(b!) grad, bool first) -> ()");
  m.def("grad_sqnorm(Tensor grad, Tensor? grad_sum, float inv_m) -> Tensor");
  m.def("form_direction(Tensor(a!) direction, Tensor(b!) grad, Tensor? grad_sum, Tensor param, "
        "int[] seg_starts, int[] seg_ends, float[] decays, float inv_m, float momentum, "
        "bool line_terms, Tensor? grad_scale=None) -> Tensor");
  m.def("train_update(Tensor(a!) param, Tensor(b!) direction, Tensor coef, Tensor ok) -> ()");
  m.def("line_move(Tensor(a!) param, Tensor origin, Tensor direction, Tensor coef) -> ()");
}

TORCH_LIBRARY_IMPL(labpal_fast, CPU, m) {
  m.impl("accumulate", &accumulate_cpu);
  m.impl("grad_sqnorm", &grad_sqnorm_cpu);
  m.impl("form_direction", &form_direction_cpu);
  m.impl("train_update", &train_update_cpu);
  m.impl("line_move", &line_move_cpu);
}

}  // namespace labpal_fast

// An importable module with no functions: importing it runs the registrations above.
extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* mod = PyModule_Create(&def);
#ifdef LABPAL_WITH_CUDA
  if (mod) PyModule_AddIntConstant(mod, "WITH_CUDA", 1);
#else
  if (mod) PyModule_AddIntConstant(mod, "WITH_CUDA", 0);
#endif
  return mod;
}
}
