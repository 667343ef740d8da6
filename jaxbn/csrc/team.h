// The scheduler of jaxbn's CPU kernels (`Team`) and how each pass splits an array among it.
// No XLA here: a Team runs on any pool with num_threads() and Schedule(fn), XLA's intra-op
// pool (ffi::ThreadPool) in the library, a plain one in tests/csrc/team_stress.cc.
// (simd.h says why everything is in an unnamed namespace.)

#ifndef JAXBN_CSRC_TEAM_H_
#define JAXBN_CSRC_TEAM_H_

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <thread>
#include <utility>
#include <vector>

namespace jaxbn {
namespace {

// ---------------------------------------------------------------------------------------
// Parallel loops on a thread pool. A Team is the calling thread plus pool threads ("helpers")
// that stay for every loop of one kernel call: the fused Forward and Backward run two loops
// with serial per-feature work between them, and waking a sleeping pool thread costs more than
// a 1 MB kernel's whole run, so each helper is woken once per call, not once per loop.
//
// The caller takes tasks too, so a loop finishes even when no pool thread is free. Tasks are
// claimed with one compare-and-swap on a ticket that holds (loop, task count, first and last
// unclaimed task) in four 16-bit fields, so a helper can never take a task of a loop that has
// moved on; the caller claims from the front and helpers from the back, so that with two
// threads each keeps the same rows in every loop of a call, still in its own cache. A helper
// that starts after the call has ended, or waits too long for the next loop, just leaves.

class Team {
 public:
  // Yields a helper waits for the next loop before leaving, and the caller waits for the
  // helpers' last tasks before sleeping in between checks.
  static constexpr int kSpins = 20000;
  static constexpr int64_t kMaxTasks = 0xffff;

  // `pool`: num_threads() and Schedule(fn), which runs fn on a pool thread, or inline on the
  // calling thread when it cannot; it must outlive the Team (helpers do not touch it).
  template <typename Pool>
  explicit Team(Pool& pool)
      : pool_(&pool),
        workers_(std::max<int64_t>(1, pool.num_threads())),
        schedule_([](void* pool, std::shared_ptr<State> state) {
          static_cast<Pool*>(pool)->Schedule([state = std::move(state)] { Help(*state); });
        }),
        state_(std::make_shared<State>()) {}
  ~Team() { state_->ticket.store(kFinished, std::memory_order_release); }
  Team(const Team&) = delete;
  Team& operator=(const Team&) = delete;

  int64_t Workers() const { return workers_; }

  // Runs fn(0), ..., fn(n - 1), in parallel; returns when all have finished, and throws
  // std::runtime_error if any of them threw.
  template <typename Fn>
  void Run(int64_t n, Fn&& fn) {
    if (n <= 1) {
      if (n == 1) fn(0);
      return;
    }
    // More indices than a ticket can count run in strides over kMaxTasks tasks.
    const int64_t num_tasks = std::min(n, kMaxTasks);
    std::function<void(int64_t)> task = [&fn, n, num_tasks](int64_t t) {
      for (int64_t i = t; i < n; i += num_tasks) fn(i);
    };
    State& s = *state_;
    ++loop_;
    s.task[loop_ & 1].store(&task, std::memory_order_relaxed);
    s.done.store(0, std::memory_order_relaxed);
    s.ticket.store(Pack(loop_, num_tasks, 0, num_tasks), std::memory_order_release);
    const int64_t wanted = std::min(num_tasks, Workers()) - 1;
    scheduling_ = true;  // Schedule may run a helper inline, on this thread (see Help)
    for (int64_t h = s.helpers.load(); h < wanted; ++h) {
      s.helpers.fetch_add(1);
      schedule_(pool_, state_);
    }
    scheduling_ = false;
    while (Claim(s, loop_, /*from_front=*/true)) {
    }
    for (int spin = 0; s.done.load(std::memory_order_acquire) != num_tasks; ++spin) {
      // Claimed tasks are running; the wait is usually microseconds.
      if (spin < kSpins) {
        std::this_thread::yield();
      } else {
        std::this_thread::sleep_for(std::chrono::microseconds(20));
      }
    }
    if (s.failed.load(std::memory_order_acquire)) {
      s.failed.store(false, std::memory_order_relaxed);
      throw std::runtime_error("a parallel task failed (out of memory?)");
    }
  }

 private:
  static constexpr uint64_t kFinished = ~uint64_t{0};

  struct State {
    std::atomic<uint64_t> ticket{0};  // loop | task count | first | end of the unclaimed
    std::atomic<int64_t> done{0};
    std::atomic<int64_t> helpers{0};
    std::atomic<bool> failed{false};  // a task threw: its loop still ends, Run then throws
    // The loops' bodies, by loop parity: a claimed task's loop cannot end, and so its slot
    // cannot be reused, before the task is done.
    std::atomic<const std::function<void(int64_t)>*> task[2] = {nullptr, nullptr};
  };

  static uint64_t Pack(uint64_t loop, int64_t num_tasks, int64_t first, int64_t end) {
    return ((loop & 0xffff) << 48) | (static_cast<uint64_t>(num_tasks) << 32) |
           (static_cast<uint64_t>(first) << 16) | static_cast<uint64_t>(end);
  }
  static uint64_t Field(uint64_t ticket, int shift) { return (ticket >> shift) & 0xffff; }

  // Takes and runs one task of `loop` (of the current loop if loop == 0), the first or the
  // last unclaimed one; false if none is left.
  static bool Claim(State& s, uint64_t loop, bool from_front) {
    uint64_t t = s.ticket.load(std::memory_order_acquire);
    for (;;) {
      if (t == kFinished || (loop != 0 && Field(t, 48) != (loop & 0xffff))) return false;
      const int64_t first = static_cast<int64_t>(Field(t, 16));
      const int64_t end = static_cast<int64_t>(Field(t, 0));
      if (first >= end) return false;
      const int64_t task = from_front ? first : end - 1;
      const uint64_t claimed = Pack(Field(t, 48), static_cast<int64_t>(Field(t, 32)),
                                    from_front ? first + 1 : first, from_front ? end : end - 1);
      if (s.ticket.compare_exchange_weak(t, claimed, std::memory_order_acq_rel)) {
        try {
          (*s.task[Field(t, 48) & 1].load(std::memory_order_relaxed))(task);
        } catch (...) {
          s.failed.store(true, std::memory_order_release);
        }
        s.done.fetch_add(1, std::memory_order_release);
        return true;
      }
    }
  }

  static void Help(State& s) {
    if (scheduling_) {
      // Run inline by a failed Schedule: waiting here for the next loop would stall the
      // caller, which cannot publish it until this returns.
      while (Claim(s, 0, /*from_front=*/false)) {
      }
      s.helpers.fetch_sub(1);
      return;
    }
    for (int idle = 0; idle < kSpins; ++idle) {
      if (s.ticket.load(std::memory_order_acquire) == kFinished) break;
      if (Claim(s, 0, /*from_front=*/false)) {
        idle = 0;
      } else {
        std::this_thread::yield();
      }
    }
    s.helpers.fetch_sub(1);
  }

  static inline thread_local bool scheduling_ = false;
  void* pool_;
  int64_t workers_;
  void (*schedule_)(void* pool, std::shared_ptr<State> state);  // one helper, on pool_
  std::shared_ptr<State> state_;
  uint64_t loop_ = 0;
};

// Runs fn(p, sums) for every part p < parts in parallel, each into its own zeroed Sums
// (Moments or FeatureSums of `features`), then merges them into `out` in part order: a fixed
// order, so the result does not depend on which thread ran which part.
template <typename Sums, typename Fn>
void Reduce(Team& team, int64_t parts, int64_t features, Sums& out, Fn&& fn) {
  std::vector<Sums> partial(parts, Sums(features));
  team.Run(parts, [&](int64_t p) { fn(p, partial[p]); });
  for (const Sums& sums : partial) out.Merge(sums);
}

// ---------------------------------------------------------------------------------------
// How the passes split an array among a Team. Every array is viewed as (outer, C, inner):
// C features, reduced over outer and inner (NHWC with axis=-1 is (N·H·W, C, 1); NCHW is
// (N, C, H·W)).

struct Shape3 {
  int64_t outer, features, inner;
};

// Below this many elements per thread a second thread costs more than it saves.
constexpr int64_t kMinElementsPerThread = 1 << 16;
// Float sums run over at most kChunkRows values (channels-last: one accumulator per feature)
// or kPieceElements values in kLanes accumulators (channels-first) — 16 to 64 terms, so
// their rounding stays within a few float32 ulps — and everything longer adds up in double.
constexpr int64_t kChunkRows = 16;
constexpr int64_t kPieceElements = 1024;

// Splits [0, n) into `parts` contiguous ranges whose boundaries are multiples of `align`.
struct Split {
  int64_t n, parts, align;
  int64_t Begin(int64_t p) const {
    int64_t units = (n + align - 1) / align;
    return std::min(n, (units * p / parts) * align);
  }
  int64_t End(int64_t p) const { return Begin(p + 1); }
};

inline int64_t NumParts(const Team& team, int64_t elements) {
  return std::max<int64_t>(1, std::min(team.Workers(), elements / kMinElementsPerThread));
}

// Channels-last (inner == 1): every pass splits the rows alike (whole chunks of kChunkRows),
// so within a call each task meets the rows it had in the previous pass, still in its
// thread's cache.
inline Split RowSplit(const Team& team, int64_t rows, int64_t features) {
  return Split{rows, NumParts(team, rows * features), kChunkRows};
}

// Channels-first (inner > 1): one piece of a segment of `inner` contiguous values of one
// feature.
struct Piece {
  int64_t feature;
  int64_t offset;       // of its first value in x (and in dy, y, dx)
  int64_t len;          // at most kPieceElements
  const uint8_t* mask;  // its len mask bytes; null without a mask
};

// The one piece iterator of every channels-first pass: segments cut into pieces of at most
// kPieceElements, the pieces of all segments split evenly into parts, so that one long
// segment (N = 1) is spread over all threads too, and each part meets the same values in
// every pass of a call. A Team runs the parts: parts p < parts(), each pieces.ForEach(p, fn).
class Pieces {
 public:
  Pieces(const Team& team, Shape3 s, const uint8_t* mask)
      : s_(s),
        mask_(mask),
        per_segment_((s.inner + kPieceElements - 1) / kPieceElements),
        size_((s.inner + per_segment_ - 1) / per_segment_),
        split_{s.outer * s.features * per_segment_, NumParts(team, s.outer * s.features * s.inner),
               1} {}

  int64_t parts() const { return split_.parts; }

  // Runs fn(piece) for each piece of part p, in order.
  template <typename Fn>
  void ForEach(int64_t p, Fn&& fn) const {
    const int64_t end = split_.End(p);  // once, not after every piece (see MapWith)
    for (int64_t item = split_.Begin(p); item < end; ++item) fn(At(item));
  }

 private:
  Piece At(int64_t item) const {
    const int64_t segment = item / per_segment_;
    const int64_t start = (item % per_segment_) * size_;
    return Piece{segment % s_.features, segment * s_.inner + start,
                 std::min(size_, s_.inner - start),
                 mask_ ? mask_ + (segment / s_.features) * s_.inner + start : nullptr};
  }

  Shape3 s_;
  const uint8_t* mask_;
  int64_t per_segment_, size_;
  Split split_;
};

}  // namespace
}  // namespace jaxbn

#endif  // JAXBN_CSRC_TEAM_H_
