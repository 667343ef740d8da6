// jaxbn's CPU kernels: the XLA FFI handlers for the passes over activations that batch
// normalization needs. The passes are in moments.h, grad_sums.h and maps.h (their shared sweeps in
// reductions.h), the scheduler that runs them in team.h,
// the element types and SIMD vectors in simd.h; this file binds operands and runs the
// per-feature formulas between passes.
//
// XLA:CPU compiles jaxbn's pure-JAX batch norm to 15 activation-sized transfers where the
// maths needs 8 (docs/performance.md says why). These kernels do the streaming parts in as
// few passes as the maths allows:
//
//   jaxbn_moments     x, mask                     → hi, lo, M2           eqs. (1)-(2)
//   jaxbn_normalize   x, mask, hi, lo, a, b       → y                    eqs. (3)-(4)
//   jaxbn_grad_sums   x, dy, mask, hi, lo         → Σ dy, Σ dy·(x − μ)   eqs. (5)-(6)
//   jaxbn_grad_input  x, dy, mask, hi, lo, a, b, k → dx                  closed form of (7)
//   jaxbn_forward     moments, then normalize, one call
//   jaxbn_backward    gradient sums, then the gradient input, one call
//
// Forward and Backward serve a batch on one device, with jaxbn/_per_feature.py's formulas
// between the passes; under axis_name JAX calls the four passes separately and pools across
// devices between them. Operands are bound in the order jaxbn/_cpu/calls.py passes them; every
// handler starts with XLA's thread pool and x's (features, inner) view as attributes.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <exception>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "grad_sums.h"
#include "maps.h"
#include "moments.h"
#include "simd.h"
#include "team.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jaxbn {
namespace {

// Calls fn(tag) with a null pointer of the C++ type of `dtype`. Every handler goes through
// here, so this is also where an exception (std::bad_alloc from a scratch vector) becomes an
// XLA error instead of unwinding into XLA's C caller.
template <typename Fn>
ffi::Error DispatchType(ffi::DataType dtype, const char* what, Fn&& fn) {
  try {
    switch (dtype) {
      case ffi::DataType::F32:
        return fn(static_cast<float*>(nullptr));
      case ffi::DataType::F64:
        return fn(static_cast<double*>(nullptr));
      case ffi::DataType::BF16:
        return fn(static_cast<BF16*>(nullptr));
      default:
        return ffi::Error::InvalidArgument(std::string("jaxbn: unsupported dtype for ") + what);
    }
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("jaxbn: ") + e.what());
  }
}

// Calls fn(x_tag, other_tag) for x's dtype and a second operand's (dy, or the output y).
template <typename Fn>
ffi::Error DispatchTypes(ffi::DataType x, ffi::DataType other, const char* what, Fn&& fn) {
  return DispatchType(x, "x", [&](auto* xtag) {
    return DispatchType(other, what, [&](auto* otag) { return fn(xtag, otag); });
  });
}

// The (outer, C, inner) view of x, whatever its rank: JAX passes C and inner as attributes,
// so no reshape (which XLA:CPU may turn into a copy) comes between x and the kernel.
bool AsShape3(const ffi::AnyBuffer& buffer, int64_t features, int64_t inner, Shape3* shape) {
  const int64_t total = static_cast<int64_t>(buffer.element_count());
  if (features <= 0 || inner <= 0 || total % (features * inner) != 0) return false;
  *shape = Shape3{total / (features * inner), features, inner};
  return true;
}

ffi::Error BadShape() {
  return ffi::Error::InvalidArgument("jaxbn: x does not split into (outer, features, inner)");
}

// The mask operand: empty (no mask) or one bool per (outer, inner) position.
bool MaskOf(const ffi::AnyBuffer& mask, Shape3 s, const uint8_t** kept) {
  *kept = nullptr;
  if (mask.element_count() == 0) return true;
  const ffi::DataType type = mask.element_type();
  if ((type != ffi::DataType::PRED && type != ffi::DataType::U8) ||
      static_cast<int64_t>(mask.element_count()) != s.outer * s.inner)
    return false;
  *kept = reinterpret_cast<const uint8_t*>(mask.untyped_data());
  return true;
}

ffi::Error BadMask() {
  return ffi::Error::InvalidArgument(
      "jaxbn: the mask must be empty or hold one bool per (outer, inner) position");
}

// x as (outer, features, inner) and its mask (null for none), or why the operands do not fit.
ffi::Error View(const ffi::AnyBuffer& x, const ffi::AnyBuffer& mask, int64_t features,
                int64_t inner, Shape3* shape, const uint8_t** kept) {
  if (!AsShape3(x, features, inner, shape)) return BadShape();
  if (!MaskOf(mask, *shape, kept)) return BadMask();
  return ffi::Error::Success();
}

// Typed views of untyped buffers (bfloat16 has no C++ type the FFI headers know).
template <typename T>
const T* Data(const ffi::AnyBuffer& b) {
  return reinterpret_cast<const T*>(b.untyped_data());
}
template <typename T>
T* Data(ffi::Result<ffi::AnyBuffer>& b) {
  return reinterpret_cast<T*>(b->untyped_data());
}

// ---------------------------------------------------------------------------------------
// The four passes, one call each (used under axis_name, where JAX pools between them).

ffi::Error MomentsImpl(ffi::ThreadPool pool, int64_t features, int64_t inner, ffi::AnyBuffer x,
                       ffi::AnyBuffer mask, ffi::Result<ffi::AnyBuffer> hi,
                       ffi::Result<ffi::AnyBuffer> lo, ffi::Result<ffi::AnyBuffer> m2) {
  Shape3 shape;
  const uint8_t* kept;
  if (ffi::Error e = View(x, mask, features, inner, &shape, &kept); e.failure()) return e;
  Team team(pool);
  return DispatchType(x.element_type(), "x", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using A = Compute<T>;
    Moments moments(features);
    BatchMoments(team, Data<T>(x), kept, shape, moments);
    A* m2_out = Data<A>(m2);
    for (int64_t c = 0; c < features; ++c) {
      SplitMean(moments, c, Data<A>(hi), Data<A>(lo));
      m2_out[c] = static_cast<A>(moments.m2[c]);
    }
    return ffi::Error::Success();
  });
}

ffi::Error GradSumsImpl(ffi::ThreadPool pool, int64_t features, int64_t inner, ffi::AnyBuffer x,
                        ffi::AnyBuffer dy, ffi::AnyBuffer mask, ffi::AnyBuffer hi,
                        ffi::AnyBuffer lo, ffi::Result<ffi::AnyBuffer> sum_dy,
                        ffi::Result<ffi::AnyBuffer> sum_dy_xc) {
  Shape3 shape;
  const uint8_t* kept;
  if (ffi::Error e = View(x, mask, features, inner, &shape, &kept); e.failure()) return e;
  Team team(pool);
  return DispatchTypes(x.element_type(), dy.element_type(), "dy",
                       [&](auto* xtag, auto* gtag) {
    using T = std::remove_pointer_t<decltype(xtag)>;
    using G = std::remove_pointer_t<decltype(gtag)>;
    using A = Compute<T>;
    FeatureSums sums(features);
    BatchGradSums(team, Data<T>(x), Data<G>(dy), kept, shape, Data<A>(hi), Data<A>(lo),
                  sums);
    A* sg_out = Data<A>(sum_dy);
    A* sgc_out = Data<A>(sum_dy_xc);
    for (int64_t c = 0; c < features; ++c) {
      sg_out[c] = static_cast<A>(sums.g[c]);
      sgc_out[c] = static_cast<A>(sums.gc[c]);
    }
    return ffi::Error::Success();
  });
}

ffi::Error NormalizeImpl(ffi::ThreadPool pool, int64_t features, int64_t inner, ffi::AnyBuffer x,
                         ffi::AnyBuffer mask, ffi::AnyBuffer hi, ffi::AnyBuffer lo,
                         ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> y) {
  Shape3 shape;
  const uint8_t* kept;
  if (ffi::Error e = View(x, mask, features, inner, &shape, &kept); e.failure()) return e;
  Team team(pool);
  return DispatchTypes(x.element_type(), y->element_type(), "y",
                       [&](auto* xtag, auto* ytag) {
    using T = std::remove_pointer_t<decltype(xtag)>;
    using Y = std::remove_pointer_t<decltype(ytag)>;
    using A = Compute<T>;
    NormalizeMap(team, Data<T>(x), kept, Data<Y>(y), shape,
                 Normalization<const A*>{Data<A>(hi), Data<A>(lo), Data<A>(a), Data<A>(b)});
    return ffi::Error::Success();
  });
}

ffi::Error GradInputImpl(ffi::ThreadPool pool, int64_t features, int64_t inner, ffi::AnyBuffer x,
                         ffi::AnyBuffer dy, ffi::AnyBuffer mask, ffi::AnyBuffer hi,
                         ffi::AnyBuffer lo, ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::AnyBuffer k,
                         ffi::Result<ffi::AnyBuffer> dx) {
  Shape3 shape;
  const uint8_t* kept;
  if (ffi::Error e = View(x, mask, features, inner, &shape, &kept); e.failure()) return e;
  Team team(pool);
  return DispatchTypes(x.element_type(), dy.element_type(), "dy",
                       [&](auto* xtag, auto* gtag) {
    using T = std::remove_pointer_t<decltype(xtag)>;
    using G = std::remove_pointer_t<decltype(gtag)>;
    using A = Compute<T>;
    // dx has x's dtype (JAX checks that against the ffi_call's declared result).
    GradInputMap(team, Data<T>(x), Data<G>(dy), kept, Data<T>(dx), shape,
                 GradInput<const A*>{Data<A>(hi), Data<A>(lo), Data<A>(a), Data<A>(b),
                                     Data<A>(k)});
    return ffi::Error::Success();
  });
}

// ---------------------------------------------------------------------------------------
// The whole training forward and the whole backward of a batch on one device, one call
// each. Between the passes the per-feature formulas of jaxbn/_per_feature.py run here, in
// the same order of operations in the compute type, so XLA runs nothing between them: on
// CPU each XLA op between two custom calls costs tens of microseconds of hand-off between
// threads, more than the passes themselves over a 1 MB batch. (Under axis_name the
// statistics are pooled across devices between the passes, in JAX, with the kernels above.)
// m is the number of unmasked values per feature, at least 1 (a feature with none has
// μ = 0 and var = 0, and all its outputs are masked).
//
//   Forward:   moments; var = max(M2/m, 0); 1/σ = 1/√(var + ε); y = ((x − hi) − lo)·(γ/σ) + β
//   Backward:  Σ dy, Σ dy·(x − μ); ∂L/∂β = Σ dy, ∂L/∂γ = Σ dy·(x − μ)/σ, and dx with
//              a = γ/σ, b = −a·(Σ dy)/m, k = −a/σ²·(Σ dy·(x − μ))/m

ffi::Error ForwardImpl(ffi::ThreadPool pool, int64_t features, int64_t inner, double epsilon,
                       ffi::AnyBuffer x, ffi::AnyBuffer mask, ffi::AnyBuffer scale,
                       ffi::AnyBuffer bias, ffi::Result<ffi::AnyBuffer> y,
                       ffi::Result<ffi::AnyBuffer> hi, ffi::Result<ffi::AnyBuffer> lo,
                       ffi::Result<ffi::AnyBuffer> var, ffi::Result<ffi::AnyBuffer> inv_std,
                       ffi::Result<ffi::AnyBuffer> count) {
  Shape3 shape;
  const uint8_t* kept;
  if (ffi::Error e = View(x, mask, features, inner, &shape, &kept); e.failure()) return e;
  Team team(pool);
  return DispatchTypes(x.element_type(), y->element_type(), "y",
                       [&](auto* xtag, auto* ytag) {
    using T = std::remove_pointer_t<decltype(xtag)>;
    using Y = std::remove_pointer_t<decltype(ytag)>;
    using A = Compute<T>;
    Moments moments(features);
    BatchMoments(team, Data<T>(x), kept, shape, moments);  // eqs. (1)-(2)
    const A eps = static_cast<A>(epsilon);
    const A* gamma = Data<A>(scale);
    A* var_out = Data<A>(var);
    A* inv_out = Data<A>(inv_std);
    // m per feature, written only with a mask (without one JAX knows it: count is empty).
    A* count_out = count->element_count() > 0 ? Data<A>(count) : nullptr;
    std::vector<A> a(features);
    for (int64_t c = 0; c < features; ++c) {
      SplitMean(moments, c, Data<A>(hi), Data<A>(lo));
      const A m = static_cast<A>(moments.count[c]);
      if (count_out != nullptr) count_out[c] = m;
      var_out[c] = std::max(static_cast<A>(moments.m2[c]) / std::max(m, A(1)), A(0));
      // _per_feature.inverse_std: an overflowed variance gives NaN, not 1/√inf = 0.
      inv_out[c] = std::isinf(var_out[c]) ? std::numeric_limits<A>::quiet_NaN()
                                          : A(1) / std::sqrt(var_out[c] + eps);
      a[c] = gamma[c] * inv_out[c];
    }
    NormalizeMap(team, Data<T>(x), kept, Data<Y>(y), shape,  // eqs. (3)-(4)
                 Normalization<const A*>{Data<A>(hi), Data<A>(lo), a.data(), Data<A>(bias)});
    return ffi::Error::Success();
  });
}

ffi::Error BackwardImpl(ffi::ThreadPool pool, int64_t features, int64_t inner, ffi::AnyBuffer x,
                        ffi::AnyBuffer dy, ffi::AnyBuffer mask, ffi::AnyBuffer hi,
                        ffi::AnyBuffer lo, ffi::AnyBuffer inv_std, ffi::AnyBuffer scale,
                        ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::AnyBuffer> d_scale,
                        ffi::Result<ffi::AnyBuffer> d_bias) {
  Shape3 shape;
  const uint8_t* kept;
  if (ffi::Error e = View(x, mask, features, inner, &shape, &kept); e.failure()) return e;
  Team team(pool);
  return DispatchTypes(x.element_type(), dy.element_type(), "dy",
                       [&](auto* xtag, auto* gtag) {
    using T = std::remove_pointer_t<decltype(xtag)>;
    using G = std::remove_pointer_t<decltype(gtag)>;
    using A = Compute<T>;
    const A* mu_hi = Data<A>(hi);
    const A* mu_lo = Data<A>(lo);
    FeatureSums sums(features);
    BatchGradSums(team, Data<T>(x), Data<G>(dy), kept, shape, mu_hi, mu_lo, sums);
    const int64_t positions = shape.outer * shape.inner;
    const A count =
        std::max(static_cast<A>(kept ? CountKept(kept, positions) : positions), A(1));
    const A* inv = Data<A>(inv_std);
    const A* gamma = Data<A>(scale);
    A* d_scale_out = Data<A>(d_scale);
    A* d_bias_out = Data<A>(d_bias);
    std::vector<A> a(features), b(features), k(features);
    for (int64_t c = 0; c < features; ++c) {
      const A sum_g = static_cast<A>(sums.g[c]), sum_gc = static_cast<A>(sums.gc[c]);
      d_bias_out[c] = sum_g;              // eq. (6)
      d_scale_out[c] = sum_gc * inv[c];  // eq. (5)
      a[c] = gamma[c] * inv[c];          // closed form of (7)
      b[c] = -a[c] * (sum_g / count);
      k[c] = -a[c] * (inv[c] * inv[c]) * (sum_gc / count);
    }
    GradInputMap(team, Data<T>(x), Data<G>(dy), kept, Data<T>(dx), shape,
                 GradInput<const A*>{mu_hi, mu_lo, a.data(), b.data(), k.data()});
    return ffi::Error::Success();
  });
}

}  // namespace
}  // namespace jaxbn

// The bindings, one operand a line in jaxbn/_cpu/calls.py's order. An empty mask means no mask.
// (The FFI binds every buffer as AnyBuffer: bfloat16 has no typed Buffer, and each handler
// checks dtypes itself in DispatchType.)

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxbnMoments, jaxbn::MomentsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Attr<int64_t>("features")
                                  .Attr<int64_t>("inner")
                                  .Arg<ffi::AnyBuffer>()    // x
                                  .Arg<ffi::AnyBuffer>()    // mask
                                  .Ret<ffi::AnyBuffer>()    // hi: μ = hi + lo
                                  .Ret<ffi::AnyBuffer>()    // lo
                                  .Ret<ffi::AnyBuffer>());  // M2 = Σ (x − μ)²

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxbnGradSums, jaxbn::GradSumsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Attr<int64_t>("features")
                                  .Attr<int64_t>("inner")
                                  .Arg<ffi::AnyBuffer>()    // x
                                  .Arg<ffi::AnyBuffer>()    // dy
                                  .Arg<ffi::AnyBuffer>()    // mask
                                  .Arg<ffi::AnyBuffer>()    // hi
                                  .Arg<ffi::AnyBuffer>()    // lo
                                  .Ret<ffi::AnyBuffer>()    // Σ dy
                                  .Ret<ffi::AnyBuffer>());  // Σ dy·(x − μ)

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxbnNormalize, jaxbn::NormalizeImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Attr<int64_t>("features")
                                  .Attr<int64_t>("inner")
                                  .Arg<ffi::AnyBuffer>()    // x
                                  .Arg<ffi::AnyBuffer>()    // mask
                                  .Arg<ffi::AnyBuffer>()    // hi
                                  .Arg<ffi::AnyBuffer>()    // lo
                                  .Arg<ffi::AnyBuffer>()    // a = γ/σ
                                  .Arg<ffi::AnyBuffer>()    // b = β
                                  .Ret<ffi::AnyBuffer>());  // y

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxbnGradInput, jaxbn::GradInputImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Attr<int64_t>("features")
                                  .Attr<int64_t>("inner")
                                  .Arg<ffi::AnyBuffer>()    // x
                                  .Arg<ffi::AnyBuffer>()    // dy
                                  .Arg<ffi::AnyBuffer>()    // mask
                                  .Arg<ffi::AnyBuffer>()    // hi
                                  .Arg<ffi::AnyBuffer>()    // lo
                                  .Arg<ffi::AnyBuffer>()    // a
                                  .Arg<ffi::AnyBuffer>()    // b
                                  .Arg<ffi::AnyBuffer>()    // k
                                  .Ret<ffi::AnyBuffer>());  // dx

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxbnForward, jaxbn::ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Attr<int64_t>("features")
                                  .Attr<int64_t>("inner")
                                  .Attr<double>("epsilon")
                                  .Arg<ffi::AnyBuffer>()    // x
                                  .Arg<ffi::AnyBuffer>()    // mask
                                  .Arg<ffi::AnyBuffer>()    // scale (γ)
                                  .Arg<ffi::AnyBuffer>()    // bias (β)
                                  .Ret<ffi::AnyBuffer>()    // y
                                  .Ret<ffi::AnyBuffer>()    // hi
                                  .Ret<ffi::AnyBuffer>()    // lo
                                  .Ret<ffi::AnyBuffer>()    // var (biased, without ε)
                                  .Ret<ffi::AnyBuffer>()    // inv_std = 1/σ
                                  .Ret<ffi::AnyBuffer>());  // count m (empty without a mask)

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxbnBackward, jaxbn::BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Attr<int64_t>("features")
                                  .Attr<int64_t>("inner")
                                  .Arg<ffi::AnyBuffer>()    // x
                                  .Arg<ffi::AnyBuffer>()    // dy
                                  .Arg<ffi::AnyBuffer>()    // mask
                                  .Arg<ffi::AnyBuffer>()    // hi
                                  .Arg<ffi::AnyBuffer>()    // lo
                                  .Arg<ffi::AnyBuffer>()    // inv_std
                                  .Arg<ffi::AnyBuffer>()    // scale (γ)
                                  .Ret<ffi::AnyBuffer>()    // dx
                                  .Ret<ffi::AnyBuffer>()    // ∂L/∂γ
                                  .Ret<ffi::AnyBuffer>());  // ∂L/∂β
