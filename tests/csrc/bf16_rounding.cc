// float32 ↔ bfloat16 conversions of jaxbn's kernels (jaxbn/csrc/simd.h) against a reference
// written here from the definition, outside XLA. The rounding of a pattern depends on its top
// 16 bits (sign, exponent, the 7 mantissa bits kept) and on whether its low 16 bits are zero,
// below, at or above the halfway point 0x8000 (and, for NaN, on whether any mantissa bit is
// set), so every top half is taken with 16 low halves that cover those cases:
//
//   1. the vector store (StoreV<float> into BF16, 16 values at a time: the AVX2 intrinsics or
//      the generic vector code, whichever the build's -march selects) equals the scalar
//      ToBF16, bit for bit — with `all`, on every one of the 2^32 patterns (20-40 s);
//   2. ToBF16 equals the reference: round to nearest, ties to even, overflow to infinity, and
//      a NaN stays a NaN of the same sign, quieted, with its top payload bits;
//   3. the vector loads (LoadV and LoadUsedOnce, BF16 into float: their AVX2 shuffles or the
//      generic code) give every one of the 2^16 bfloat16 patterns as the float with those
//      top bits, bit for bit, NaN payloads included, in every lane.
//
//   g++ -O2 -march=native -std=c++17 -Ijaxbn/csrc tests/csrc/bf16_rounding.cc -o /tmp/bf16
//   /tmp/bf16 [all]    # prints "ok" and exits 0, or the first mismatches and exits 1
//
// tests/cpu/test_simd.py builds it with -march=native and, on x86, for a target without
// AVX2 (the generic path).

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>

#include "simd.h"

namespace {

using jaxbn::BF16;

float FromBits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// The bfloat16 nearest to f (ties to the even one), as bits, from the definition: the two
// bfloat16 values that bracket f are its truncation and the next one away from zero; compare
// the distances in double, which holds both differences exactly.
uint16_t Reference(uint32_t u) {
  const float f = FromBits(u);
  if (std::isnan(f)) return static_cast<uint16_t>((u >> 16) | 0x40u);
  const uint16_t truncated = static_cast<uint16_t>(u >> 16);
  if ((u & 0xffffu) == 0) return truncated;
  const uint16_t away = static_cast<uint16_t>(truncated + 1);  // carries into the exponent
  const double lo = std::fabs(static_cast<double>(FromBits(uint32_t{truncated} << 16)));
  // Past the largest finite value the next one up is 2^128, which rounds (overflows) to the
  // infinity that `away` encodes.
  const bool overflows = (away & 0x7fffu) == 0x7f80u;
  const double hi = overflows ? std::ldexp(1.0, 128)
                              : std::fabs(static_cast<double>(FromBits(uint32_t{away} << 16)));
  const double x = std::fabs(static_cast<double>(f));
  if (x - lo < hi - x) return truncated;
  if (hi - x < x - lo) return away;
  return (truncated & 1u) ? away : truncated;
}

// 16 low halves: zero, the smallest, around and at the halfway point, the largest, others.
constexpr uint32_t kLows[16] = {0x0000, 0x0001, 0x0002, 0x3fff, 0x7ffe, 0x7fff, 0x8000, 0x8001,
                                0x8002, 0xc000, 0xfffe, 0xffff, 0x1234, 0x5678, 0x9abc, 0xdef0};

int failures = 0;

// The vector store of 16 patterns against the scalar ToBF16 and the reference.
void Check(const uint32_t (&bits)[16], bool against_reference) {
  alignas(64) float in[16];
  alignas(64) BF16 out[16];
  for (int l = 0; l < 16; ++l) in[l] = FromBits(bits[l]);
  jaxbn::StoreV<float>(out, jaxbn::LoadV<float>(in));
  for (int l = 0; l < 16; ++l) {
    const uint32_t u = bits[l];
    const uint16_t scalar = jaxbn::ToBF16(in[l]).bits;
    if (out[l].bits != scalar && failures++ < 10)
      std::printf("vector store: %08x -> %04x, scalar %04x\n", u, out[l].bits, scalar);
    if (against_reference && scalar != Reference(u) && failures++ < 20)
      std::printf("scalar: %08x -> %04x, reference %04x\n", u, scalar, Reference(u));
  }
}

// 16 bfloat16 patterns from `first` on (wrapping) through both vector loads, each lane
// against the float whose top half is the pattern.
void CheckLoads(uint32_t first) {
  BF16 in[16];
  for (int l = 0; l < 16; ++l) in[l] = BF16{static_cast<uint16_t>(first + l)};
  const jaxbn::Simd<float> loads[2] = {jaxbn::LoadV<float>(in), jaxbn::LoadUsedOnce<float>(in)};
  const char* names[2] = {"LoadV", "LoadUsedOnce"};
  for (int k = 0; k < 2; ++k) {
    for (int l = 0; l < 16; ++l) {
      uint32_t got;
      const float value = loads[k][l];
      std::memcpy(&got, &value, sizeof got);
      const uint32_t want = uint32_t{in[l].bits} << 16;
      if (got != want && failures++ < 30)
        std::printf("%s lane %d: %04x -> %08x, want %08x\n", names[k], l, in[l].bits, got, want);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  const bool all = argc > 1 && std::strcmp(argv[1], "all") == 0;
  uint32_t bits[16];
  for (uint32_t top = 0; top < (1u << 16); ++top) {
    for (int l = 0; l < 16; ++l) bits[l] = (top << 16) | kLows[l];
    Check(bits, /*against_reference=*/true);
  }
  // Every pattern in every lane: windows starting at each pattern would be 2^16 × 16; starts
  // 0..15 with a stride of 16 put each pattern in each lane once.
  for (uint32_t shift = 0; shift < 16; ++shift) {
    for (uint32_t base = 0; base < (1u << 16); base += 16) CheckLoads(base + shift);
  }
  if (all) {
    for (uint64_t base = 0; base < (uint64_t{1} << 32); base += 16) {
      for (int l = 0; l < 16; ++l) bits[l] = static_cast<uint32_t>(base + l);
      Check(bits, /*against_reference=*/false);
    }
  }
  if (failures != 0) {
    std::printf("%d mismatches\n", failures);
    return 1;
  }
  std::printf("ok\n");
  return 0;
}
