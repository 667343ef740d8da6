// StreamedLines (jaxbn/csrc/simd.h), the part of a run that the kernels write with streaming
// stores, on every start address within two cache lines and every run length up to 300 values,
// for 2-, 4- and 8-byte values: [first, last) is exactly the run's whole 64-byte lines —
// it starts and ends on a line boundary, lies inside the run, holds whole vectors, and no whole
// line of the run is left outside it (so every streamed line is written entirely by
// streaming stores, and every other line entirely by ordinary ones).
//
//   g++ -O2 -std=c++17 -Ijaxbn/csrc tests/csrc/streamed_lines.cc -o /tmp/lines && /tmp/lines
//
// tests/cpu/test_simd.py builds and runs it.

#include <cstdint>
#include <cstdio>

#include "simd.h"

namespace {

int failures = 0;

template <typename T>
void CheckAll() {
  alignas(64) static unsigned char memory[64 * 16];
  for (uintptr_t offset = 0; offset < 128; offset += sizeof(T)) {
    const T* p = reinterpret_cast<const T*>(memory + offset);
    for (int64_t len = 0; len <= 300; ++len) {
      const jaxbn::Streamed s = jaxbn::StreamedLines(p, len);
      const uintptr_t begin = reinterpret_cast<uintptr_t>(p);
      auto address = [&](int64_t i) { return begin + static_cast<uintptr_t>(i) * sizeof(T); };
      // Whole lines of the run before `first` or from `last` on: the line boundaries b with
      // [b, b + 64) inside the run and outside [first, last).
      int64_t missed = 0;
      for (uintptr_t b = (begin + 63) / 64 * 64; b + 64 <= address(len); b += 64)
        if (b < address(s.first) || b + 64 > address(s.last)) ++missed;
      const bool empty = s.first == s.last;
      const bool ok =
          0 <= s.first && s.first <= s.last && s.last <= len &&
          (empty || (address(s.first) % 64 == 0 && address(s.last) % 64 == 0)) &&
          (s.last - s.first) * static_cast<int64_t>(sizeof(T)) % 64 == 0 && missed == 0;
      if (!ok && failures++ < 10)
        std::printf("%zu-byte values, offset %zu, len %lld: [%lld, %lld), %lld lines missed\n",
                    sizeof(T), static_cast<size_t>(offset), static_cast<long long>(len),
                    static_cast<long long>(s.first), static_cast<long long>(s.last),
                    static_cast<long long>(missed));
    }
  }
}

}  // namespace

int main() {
  CheckAll<jaxbn::BF16>();
  CheckAll<float>();
  CheckAll<double>();
  if (failures != 0) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("ok\n");
  return 0;
}
