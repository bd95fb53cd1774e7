// A persistent pool of worker threads for the per-step compute.
//
// run(fn) calls fn(ith, nth) on every thread — the caller is thread 0 — and returns when all have finished.
// Inside fn, barrier() synchronises all nth threads, so a whole forward pass can run as one run() with a
// cheap barrier between its ops instead of a wake-up and a join per matmul.
//
// Every wait spins briefly (threads of a step arrive within microseconds of each other when they have cores)
// and then sleeps on a futex: on a shared or oversubscribed machine a descheduled peer must not turn each of
// the step's hundreds of barriers into a burnt time slice.
#pragma once
#include <atomic>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace rz {

class ThreadPool {
public:
    explicit ThreadPool(int n_threads);
    ~ThreadPool();
    ThreadPool(const ThreadPool&) = delete;
    ThreadPool& operator=(const ThreadPool&) = delete;

    int size() const { return n_threads_; }
    // Runs fn on every thread; not re-entrant (one run at a time per pool; callers serialise).
    void run(const std::function<void(int ith, int nth)>& fn);
    // All threads of the current run() must call it the same number of times.
    void barrier();

private:
    void worker(int ith);

    int n_threads_;
    std::vector<std::thread> threads_;
    const std::function<void(int, int)>* job_ = nullptr;
    // Futex words are 32-bit: the job generation, the threads still running the job, the barrier phase.
    std::atomic<uint32_t> generation_{0};
    std::atomic<uint32_t> pending_{0};
    std::atomic<bool> stop_{false};
    std::atomic<int> barrier_count_{0};
    std::atomic<uint32_t> barrier_phase_{0};
    std::atomic<int> sleepers_{0};  // threads asleep (or about to sleep) on any of the words above
    std::mutex run_mu_;
};

// Waits until word != value: spins for a short while, then sleeps on a futex (counted in sleepers).
void wait_while_equal(std::atomic<uint32_t>& word, uint32_t value, std::atomic<int>& sleepers);

// Threads from REALIZAR_THREADS, else the number of cores available to the process.
int default_thread_count();

// Splits [0, n) into nth nearly equal parts; returns thread ith's [begin, end).
inline void split_range(int64_t n, int ith, int nth, int64_t& begin, int64_t& end) {
    const int64_t per = n / nth, extra = n % nth;
    begin = ith * per + (ith < extra ? ith : extra);
    end = begin + per + (ith < extra ? 1 : 0);
}

}  // namespace rz
