#include "threadpool.h"

#include <chrono>
#include <climits>
#include <cstdlib>
#include <linux/futex.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define RZ_PAUSE() _mm_pause()
#else
#define RZ_PAUSE() ((void)0)
#endif

namespace rz {
namespace {

// How long a waiter spins before it sleeps: long enough to cover the gap between ops of a step when every
// thread has a core, short enough that a descheduled peer costs little.
constexpr auto kSpinFor = std::chrono::microseconds(100);

void futex_wait(std::atomic<uint32_t>& word, uint32_t expected) {
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(&word), FUTEX_WAIT_PRIVATE, expected, nullptr, nullptr, 0);
}

void futex_wake_all(std::atomic<uint32_t>& word) {
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(&word), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0);
}

// Spins while word == value for up to kSpinFor; returns true if it changed.
bool spin_while_equal(const std::atomic<uint32_t>& word, uint32_t value) {
    const auto deadline = std::chrono::steady_clock::now() + kSpinFor;
    for (;;) {
        for (int i = 0; i < 64; ++i) {
            if (word.load(std::memory_order_acquire) != value) return true;
            RZ_PAUSE();
        }
        if (std::chrono::steady_clock::now() > deadline) return false;
    }
}

}  // namespace

int default_thread_count() {
    if (const char* env = std::getenv("REALIZAR_THREADS")) {
        char* end = nullptr;
        long v = std::strtol(env, &end, 10);
        if (end != env && *end == '\0' && v > 0 && v <= 1024) return int(v);
    }
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) {
        int n = CPU_COUNT(&set);
        if (n > 0) return n;
    }
    unsigned hc = std::thread::hardware_concurrency();
    return hc ? int(hc) : 1;
}

ThreadPool::ThreadPool(int n_threads) : n_threads_(n_threads < 1 ? 1 : n_threads) {
    for (int i = 1; i < n_threads_; ++i) threads_.emplace_back(&ThreadPool::worker, this, i);
}

ThreadPool::~ThreadPool() {
    stop_.store(true, std::memory_order_seq_cst);
    generation_.fetch_add(1, std::memory_order_seq_cst);
    futex_wake_all(generation_);
    for (auto& t : threads_) t.join();
}

// Waits until word != value: spin, then sleep on the futex. The sleeper count is raised before the futex
// re-checks the word (seq_cst on both sides), so a waker either sees the sleeper or the sleeper sees the change.
void wait_while_equal(std::atomic<uint32_t>& word, uint32_t value, std::atomic<int>& sleepers) {
    if (spin_while_equal(word, value)) return;
    sleepers.fetch_add(1, std::memory_order_seq_cst);
    while (word.load(std::memory_order_seq_cst) == value) futex_wait(word, value);
    sleepers.fetch_sub(1, std::memory_order_seq_cst);
}

void ThreadPool::worker(int ith) {
    uint32_t seen = 0;
    for (;;) {
        wait_while_equal(generation_, seen, sleepers_);
        seen = generation_.load(std::memory_order_acquire);
        if (stop_.load(std::memory_order_acquire)) return;
        (*job_)(ith, n_threads_);
        if (pending_.fetch_sub(1, std::memory_order_seq_cst) == 1 && sleepers_.load(std::memory_order_seq_cst) > 0)
            futex_wake_all(pending_);
    }
}

void ThreadPool::run(const std::function<void(int, int)>& fn) {
    std::lock_guard<std::mutex> serial(run_mu_);
    if (n_threads_ == 1) { fn(0, 1); return; }
    job_ = &fn;
    pending_.store(uint32_t(n_threads_ - 1), std::memory_order_seq_cst);
    generation_.fetch_add(1, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) futex_wake_all(generation_);
    fn(0, n_threads_);
    for (uint32_t left; (left = pending_.load(std::memory_order_acquire)) != 0;) wait_while_equal(pending_, left, sleepers_);
}

void ThreadPool::barrier() {
    if (n_threads_ == 1) return;
    const uint32_t phase = barrier_phase_.load(std::memory_order_acquire);
    if (barrier_count_.fetch_add(1, std::memory_order_acq_rel) == n_threads_ - 1) {
        barrier_count_.store(0, std::memory_order_relaxed);
        barrier_phase_.fetch_add(1, std::memory_order_seq_cst);
        if (sleepers_.load(std::memory_order_seq_cst) > 0) futex_wake_all(barrier_phase_);
        return;
    }
    wait_while_equal(barrier_phase_, phase, sleepers_);
}

}  // namespace rz
