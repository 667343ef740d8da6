// The benchmark's floor (experiments/bench_ops.py): a BN training step's minimal memory
// traffic, eight activation-sized transfers, done by trivial streaming kernels through the
// same path as jaxbn's kernels (an XLA FFI call on XLA's intra-op pool, the same Team and
// split of the array among threads, the same vectors), so that the only difference from a
// BN step is the arithmetic and the order in which BN has to touch memory:
//
//   floor_forward   reads x (a sum), then reads x and writes y = 2x + 1      3 transfers
//   floor_backward  reads x and dy (a sum), then reads both and writes x + dy 5 transfers
//
// The sums go into a per-thread slot of a small output so that nothing can be optimized
// away. Built by the benchmark with jaxbn/csrc on the include path.

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "simd.h"
#include "team.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jaxbn {
namespace {

constexpr int64_t kAlign = 64;  // elements: every part starts on a cache line in either dtype

template <typename T>
void ReadPass(Team& team, const T* x, const T* g, int64_t n, float* sink) {
  using V = Simd<float>;
  constexpr int L = kLanes<float>;
  const Split split{n, NumParts(team, n), kAlign};
  std::vector<float> part(split.parts);
  team.Run(split.parts, [&](int64_t p) {
    V a{}, b{};
    int64_t i = split.Begin(p);
    if (g == nullptr) {  // two accumulators, as the kernels' sweeps have
      for (; i + 2 * L <= split.End(p); i += 2 * L) {
        a += LoadV<float>(x + i);
        b += LoadV<float>(x + i + L);
      }
    } else {
      for (; i + L <= split.End(p); i += L) {
        a += LoadV<float>(x + i);
        b += LoadV<float>(g + i);
      }
    }
    float s = HorizontalSum<float>(a + b);
    for (; i < split.End(p); ++i) s += Load<float>(x, i) + (g ? Load<float>(g, i) : 0.0f);
    part[p] = s;
  });
  for (float s : part) *sink += s;
}

template <typename T>
void MapPass(Team& team, const T* x, const T* g, T* out, int64_t n) {
  constexpr int L = kLanes<float>;
  const Split split{n, NumParts(team, n), kAlign};
  team.Run(split.parts, [&](int64_t p) {
    int64_t i = split.Begin(p);
    if (g == nullptr) {
      for (; i + L <= split.End(p); i += L) StoreV<float>(out + i, LoadV<float>(x + i) * 2.0f + 1.0f);
      for (; i < split.End(p); ++i) Store<float>(out, i, Load<float>(x, i) * 2.0f + 1.0f);
    } else {
      for (; i + L <= split.End(p); i += L)
        StoreV<float>(out + i, LoadV<float>(x + i) + LoadV<float>(g + i));
      for (; i < split.End(p); ++i) Store<float>(out, i, Load<float>(x, i) + Load<float>(g, i));
    }
  });
}

template <typename Fn>
ffi::Error Typed(ffi::DataType dtype, Fn&& fn) {
  switch (dtype) {
    case ffi::DataType::F32:
      return fn(static_cast<float*>(nullptr));
    case ffi::DataType::BF16:
      return fn(static_cast<BF16*>(nullptr));
    default:
      return ffi::Error::InvalidArgument("stream_floor: float32 or bfloat16 only");
  }
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y,
                       ffi::Result<ffi::AnyBuffer> sink) {
  Team team(pool);
  return Typed(x.element_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* xs = reinterpret_cast<const T*>(x.untyped_data());
    float* s = reinterpret_cast<float*>(sink->untyped_data());
    *s = 0;
    ReadPass<T>(team, xs, nullptr, x.element_count(), s);
    MapPass<T>(team, xs, nullptr, reinterpret_cast<T*>(y->untyped_data()), x.element_count());
    return ffi::Error::Success();
  });
}

ffi::Error BackwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer dy,
                        ffi::AnyBuffer /*after*/, ffi::Result<ffi::AnyBuffer> dx,
                        ffi::Result<ffi::AnyBuffer> sink) {
  Team team(pool);
  return Typed(x.element_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* xs = reinterpret_cast<const T*>(x.untyped_data());
    const T* gs = reinterpret_cast<const T*>(dy.untyped_data());
    float* s = reinterpret_cast<float*>(sink->untyped_data());
    *s = 0;
    ReadPass<T>(team, xs, gs, x.element_count(), s);
    MapPass<T>(team, xs, gs, reinterpret_cast<T*>(dx->untyped_data()), x.element_count());
    return ffi::Error::Success();
  });
}

}  // namespace
}  // namespace jaxbn

XLA_FFI_DEFINE_HANDLER_SYMBOL(FloorForward, jaxbn::ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()    // x
                                  .Ret<ffi::AnyBuffer>()    // y = 2x + 1
                                  .Ret<ffi::AnyBuffer>());  // a sum of x (float32 scalar)

XLA_FFI_DEFINE_HANDLER_SYMBOL(FloorBackward, jaxbn::BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()    // x
                                  .Arg<ffi::AnyBuffer>()    // dy
                                  .Arg<ffi::AnyBuffer>()    // the forward's sum: runs after it
                                  .Ret<ffi::AnyBuffer>()    // dx = x + dy
                                  .Ret<ffi::AnyBuffer>());  // a sum of x and dy
