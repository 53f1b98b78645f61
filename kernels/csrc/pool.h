// A small persistent thread pool for the CPU attention kernel (std::thread, not OpenMP:
// torch brings its own OpenMP runtime, and two in one process conflict).
//
// A call runs one Job: tasks [0, n) claimed one at a time by the calling thread and by at
// most `helpers` pool threads. The caller always works on its own job, so calls from
// several threads at once all progress, and a job whose helpers never come still
// finishes. Threads are created on first need, detached, and never joined: they outlive
// every call, and the library is never unloaded (ctypes does not dlclose).
#pragma once

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <thread>

namespace tk {

struct Job {
  void (*fn)(void* ctx, int64_t task) = nullptr;
  void* ctx = nullptr;
  int64_t n = 0;
  int helpers = 0;
  std::atomic<int64_t> next{0};
  int joined = 0;               // helpers that took the job (under the pool's lock)
  std::atomic<int> active{0};   // helpers inside run_some
  std::mutex mu;                // with cv: the caller waits for active == 0
  std::condition_variable cv;

  void run_some() {
    for (int64_t t; (t = next.fetch_add(1, std::memory_order_relaxed)) < n;) fn(ctx, t);
  }
};

class Pool {
 public:
  // The pool of this process: a forked child gets a fresh one (the parent's threads do
  // not exist there, and its locks may have been held at the fork).
  static Pool& get() {
    static std::atomic<Pool*> current{nullptr};
    Pool* p = current.load(std::memory_order_acquire);
    pid_t pid = getpid();
    while (p == nullptr || p->pid_ != pid) {
      Pool* fresh = new Pool(pid);
      if (current.compare_exchange_strong(p, fresh, std::memory_order_acq_rel)) return *fresh;
      delete fresh;  // another thread installed one first; p now holds it
    }
    return *p;
  }

  void run(Job& job) {
    int helpers = static_cast<int>(std::min<int64_t>(job.helpers, job.n - 1));
    if (helpers > 0) {
      job.helpers = helpers;
      std::lock_guard<std::mutex> g(mu_);
      grow(helpers);
      queue_.push_back(&job);
    }
    if (helpers > 0) {
      for (int i = 0; i < helpers; i++) cv_.notify_one();
    }
    job.run_some();
    if (helpers > 0) {
      {
        std::lock_guard<std::mutex> g(mu_);  // after this no helper can take the job
        auto it = std::find(queue_.begin(), queue_.end(), &job);
        if (it != queue_.end()) queue_.erase(it);
      }
      std::unique_lock<std::mutex> lk(job.mu);
      job.cv.wait(lk, [&] { return job.active.load(std::memory_order_acquire) == 0; });
    }
  }

 private:
  explicit Pool(pid_t pid) : pid_(pid) {}

  void grow(int want) {  // under mu_
    want = std::min(want, 256);
    while (threads_ < want) {
      std::thread([this] { work(); }).detach();
      threads_++;
    }
  }

  void work() {
    for (;;) {
      Job* job;
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return !queue_.empty(); });
        job = queue_.front();
        job->active.fetch_add(1, std::memory_order_relaxed);
        if (++job->joined >= job->helpers) queue_.pop_front();
      }
      job->run_some();
      // Under the job's lock, so the caller cannot see active == 0 and free the job
      // before this notify is done; nothing touches the job after the unlock.
      std::lock_guard<std::mutex> g(job->mu);
      job->active.fetch_sub(1, std::memory_order_release);
      job->cv.notify_all();
    }
  }

  const pid_t pid_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Job*> queue_;
  int threads_ = 0;
};

}  // namespace tk
