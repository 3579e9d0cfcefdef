// The large-block caching CPU allocator: see block_cache.h.
#include "block_cache.h"

#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <pthread.h>
#include <sys/mman.h>

#include <algorithm>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace isda {
namespace {

constexpr size_t kPage = 4096;
// transparent huge page size on x86-64 / most arm64 kernels: blocks at least this large are
// advised to use them (MADV_HUGEPAGE) when huge pages are on
constexpr size_t kHugePage = size_t(2) << 20;
// a request may take a cached block up to 1/kMaxSlackDiv larger than its class (25 %)
constexpr size_t kMaxSlackDiv = 4;

// a block made of more pieces than this is not moved again (each piece is one mremap call and
// one kernel mapping; the process may have at most vm.max_map_count, 65530 by default)
constexpr size_t kMaxPieces = 64;

// A block's pages: its byte length and the lengths of its consecutive pieces, each lying inside
// one kernel mapping (a block moved together from several blocks spans several mappings, which
// mremap cannot move in one call before Linux 6.17: it moves them piece by piece).
struct Extent {
  size_t size;  // bytes mapped (a class size, or the part of a split block)
  std::vector<size_t> pieces;
};

struct CachedBlock {
  void* ptr;
  Extent extent;
  uint64_t stamp;  // when it was freed: higher is more recent
  size_t size() const { return extent.size; }
};

// The pieces of the first `at` bytes of `pieces` into `head`, of the rest into `tail`.
void split_pieces(const std::vector<size_t>& pieces, size_t at, std::vector<size_t>* head,
                  std::vector<size_t>* tail) {
  size_t off = 0;
  for (size_t len : pieces) {
    if (off + len <= at) {
      head->push_back(len);
    } else if (off >= at) {
      tail->push_back(len);
    } else {
      head->push_back(at - off);
      tail->push_back(off + len - at);
    }
    off += len;
  }
}

void* map_anonymous(void* at, size_t size, bool fixed) {
  void* p = mmap(at, size, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | (fixed ? MAP_FIXED : 0), -1, 0);
  return p == MAP_FAILED ? nullptr : p;
}

class BlockCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    if (static_cast<int64_t>(n) < min_bytes_) {
      void* p = previous_->raw_allocate(n);
      return {p, p, &Delete, c10::Device(c10::DeviceType::CPU)};
    }
    const size_t size = block_class_size(n);
    void* p = take(size);
    if (c10::memoryProfilingEnabled()) {
      const BlockCacheStats s = stats();
      c10::reportMemoryUsageToProfiler(p, static_cast<int64_t>(size), s.in_use_bytes,
                                       s.in_use_bytes + s.cached_bytes,
                                       c10::Device(c10::DeviceType::CPU));
    }
    return {p, p, &Delete, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &Delete; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  static void Delete(void* p);

  void set_limits(int64_t min_bytes, int64_t cache_limit, bool huge_pages) {
    std::lock_guard<std::mutex> g(mu_);
    min_bytes_ = std::max<int64_t>(min_bytes, static_cast<int64_t>(kPage));
    cache_limit_ = std::max<int64_t>(cache_limit, 0);
    huge_pages_ = huge_pages;
    trim_locked(static_cast<size_t>(cache_limit_));
  }

  BlockCacheStats stats() {
    std::lock_guard<std::mutex> g(mu_);
    BlockCacheStats s;
    s.in_use_bytes = static_cast<int64_t>(in_use_);
    s.cached_bytes = static_cast<int64_t>(cached_);
    s.peak_in_use_bytes = static_cast<int64_t>(peak_in_use_);
    s.hits = hits_;
    s.misses = misses_;
    s.released = released_;
    s.repurposed = repurposed_;
    s.min_bytes = min_bytes_;
    s.cache_limit = cache_limit_;
    s.huge_pages = huge_pages_;
    return s;
  }

  int64_t release_all() {
    std::lock_guard<std::mutex> g(mu_);
    const size_t before = cached_;
    trim_locked(0);
    return static_cast<int64_t>(before);
  }

  c10::Allocator* previous_ = nullptr;
  std::mutex mu_;

 private:
  // A block of at least `size` bytes (a class size): the smallest cached block of that class or
  // of the next classes up to kMaxSlack larger (among equals the most recently freed), else a
  // new map.
  void* take(size_t size) {
    bool huge = false;
    {
      std::lock_guard<std::mutex> g(mu_);
      const size_t largest = size + size / kMaxSlackDiv;
      int best = -1;
      for (size_t i = 0; i < cache_.size(); ++i) {
        const CachedBlock& b = cache_[i];
        if (b.size() < size || b.size() > largest) continue;
        if (best < 0 || b.size() < cache_[best].size() ||
            (b.size() == cache_[best].size() && b.stamp > cache_[best].stamp)) {
          best = static_cast<int>(i);
        }
      }
      if (best >= 0) {
        CachedBlock b = std::move(cache_[best]);
        drop_cached_locked(best, b.size());
        note_in_use_locked(b.ptr, std::move(b.extent));
        ++hits_;
        return b.ptr;
      }
      ++misses_;
      huge = huge_pages_;
      if (!cache_.empty()) {
        Extent granted;
        void* q = repurpose_locked(size, huge, &granted);
        if (q != nullptr) {
          note_in_use_locked(q, std::move(granted));
          ++repurposed_;
          return q;
        }
      }
    }
    void* p = map_block(size, huge);
    if (p == nullptr) {  // out of address space or memory: give the cache back and try again
      release_all();
      p = map_block(size, huge);
    }
    TORCH_CHECK(p != nullptr, "isda CPU block cache: cannot allocate ", size, " bytes (mmap failed)");
    std::lock_guard<std::mutex> g(mu_);
    note_in_use_locked(p, Extent{size, {size}});
    return p;
  }

  // A miss while blocks of other classes sit idle: their resident pages serve the request
  // instead of fresh ones, so the process grows only once the cache is empty, and no resident
  // page is given back here (each one given back is faulted and zeroed again when the next
  // iteration needs it). The smallest idle block larger than `size` is split: its first `size`
  // bytes serve the request and its tail stays idle as a block of its own (a tail smaller than
  // the large-block threshold goes with the request instead: no pieces that no request can
  // take). If every idle block is smaller, idle blocks (largest first, while they fit) are
  // moved into one new range of `size` bytes (mremap: the kernel moves their pages, nothing is
  // copied), the rest of the range is faulted in on first touch. nullptr when nothing moved;
  // `*granted` is the block's extent (at least `size` bytes).
  void* repurpose_locked(size_t size, bool huge, Extent* granted) {
    int best = -1;
    for (size_t i = 0; i < cache_.size(); ++i) {
      if (cache_[i].size() > size && (best < 0 || cache_[i].size() < cache_[best].size())) {
        best = static_cast<int>(i);
      }
    }
    if (best >= 0) {
      CachedBlock& b = cache_[best];
      void* p = b.ptr;
      const size_t tail = b.size() - size;  // class sizes are whole pages
      if (tail < static_cast<size_t>(min_bytes_)) {
        *granted = std::move(b.extent);
        drop_cached_locked(best, granted->size);
      } else {  // the tail keeps the block's place (and its free time) in the cache
        Extent rest{tail, {}};
        granted->size = size;
        split_pieces(b.extent.pieces, size, &granted->pieces, &rest.pieces);
        cached_ -= size;
        b.ptr = static_cast<char*>(p) + size;
        b.extent = std::move(rest);
      }
      return p;
    }
    void* q = map_block(size, huge);
    if (q == nullptr) return nullptr;
    granted->size = size;
    granted->pieces.clear();
    size_t filled = 0;
    while (true) {
      int pick = -1;
      for (size_t i = 0; i < cache_.size(); ++i) {
        const CachedBlock& c = cache_[i];
        if (c.size() <= size - filled && c.extent.pieces.size() <= kMaxPieces &&
            (pick < 0 || c.size() > cache_[pick].size())) {
          pick = static_cast<int>(i);
        }
      }
      if (pick < 0) break;
      const CachedBlock b = cache_[pick];
      drop_cached_locked(pick, b.size());
      char* src = static_cast<char*>(b.ptr);
      char* dst = static_cast<char*>(q) + filled;
      size_t moved = 0;
      for (size_t len : b.extent.pieces) {
        if (mremap(src + moved, len, len, MREMAP_MAYMOVE | MREMAP_FIXED, dst + moved) == MAP_FAILED) {
          break;
        }
        granted->pieces.push_back(len);
        moved += len;
      }
      if (moved < b.size()) {
        // a move failed (e.g. the kernel's mapping count): the rest of the block goes back to
        // the system and its place in the new block is mapped afresh (older kernels unmap the
        // target range before they check the source, so it may be a hole now)
        munmap(src + moved, b.size() - moved);
        if (map_anonymous(dst + moved, b.size() - moved, /*fixed=*/true) == nullptr) {
          munmap(q, size);
          granted->pieces.clear();
          return nullptr;
        }
        granted->pieces.push_back(b.size() - moved);
      }
      filled += b.size();
    }
    if (filled == 0) {
      munmap(q, size);
      return nullptr;
    }
    if (filled < size) granted->pieces.push_back(size - filled);
    return q;
  }

  // Removes cache_[i] (`size` bytes; given when the entry was moved from).
  void drop_cached_locked(int i, size_t size) {
    cached_ -= size;
    cache_[i] = cache_.back();
    cache_.pop_back();
  }

  // A fresh anonymous mapping. With `huge`, blocks of at least one huge page are advised to use
  // transparent huge pages: one fault (and one in-kernel clear) per 2 MB instead of 512, and
  // fewer TLB misses; the kernel aligns such mappings to 2 MB itself (Linux >= 6.7), and a
  // kernel with THP off or set to "never" ignores the advice.
  static void* map_block(size_t size, bool huge) {
    void* p = map_anonymous(nullptr, size, /*fixed=*/false);
    if (p == nullptr) return nullptr;
#ifdef MADV_HUGEPAGE
    if (huge && size >= kHugePage) madvise(p, size, MADV_HUGEPAGE);
#endif
    return p;
  }

  void note_in_use_locked(void* p, Extent e) {
    in_use_ += e.size;
    live_[p] = std::move(e);
    peak_in_use_ = std::max(peak_in_use_, in_use_);
  }

  // Returns a freed block to the cache; false when `p` is not a large block of this allocator.
  bool give_back(void* p) {
    size_t size;
    {
      std::lock_guard<std::mutex> g(mu_);
      auto it = live_.find(p);
      if (it == live_.end()) return false;
      size = it->second.size;
      in_use_ -= size;
      cache_.push_back({p, std::move(it->second), ++clock_});
      live_.erase(it);
      cached_ += size;
      trim_locked(static_cast<size_t>(cache_limit_));
    }
    if (c10::memoryProfilingEnabled()) {
      const BlockCacheStats s = stats();
      c10::reportMemoryUsageToProfiler(p, -static_cast<int64_t>(size), s.in_use_bytes,
                                       s.in_use_bytes + s.cached_bytes,
                                       c10::Device(c10::DeviceType::CPU));
    }
    return true;
  }

  // Unmaps the least recently freed cached blocks until at most `limit` bytes stay cached.
  void trim_locked(size_t limit) {
    while (cached_ > limit && !cache_.empty()) {
      size_t oldest = 0;
      for (size_t i = 1; i < cache_.size(); ++i) {
        if (cache_[i].stamp < cache_[oldest].stamp) oldest = i;
      }
      munmap(cache_[oldest].ptr, cache_[oldest].size());
      cached_ -= cache_[oldest].size();
      cache_[oldest] = cache_.back();
      cache_.pop_back();
      ++released_;
    }
  }

  int64_t min_bytes_ = 1 << 20;
  int64_t cache_limit_ = int64_t(1) << 30;
  bool huge_pages_ = false;
  std::vector<CachedBlock> cache_;
  std::unordered_map<void*, Extent> live_;
  size_t in_use_ = 0, cached_ = 0, peak_in_use_ = 0;
  uint64_t clock_ = 0;
  int64_t hits_ = 0, misses_ = 0, released_ = 0, repurposed_ = 0;
};

// Never destroyed: tensors may be freed during interpreter shutdown.
BlockCache* g_cache = nullptr;

void BlockCache::Delete(void* p) {
  if (p == nullptr) return;
  if (!g_cache->give_back(p)) g_cache->previous_->raw_deleter()(p);
}

// fork() while another thread holds the lock would leave the child's lock taken for good
void lock_before_fork() { g_cache->mu_.lock(); }
void unlock_after_fork() { g_cache->mu_.unlock(); }

}  // namespace

size_t block_class_size(size_t n) {
  size_t top = size_t(1) << (63 - __builtin_clzll(static_cast<unsigned long long>(n)));
  size_t step = std::max(top / 8, kPage);
  return (n + step - 1) / step * step;
}

bool install_block_cache(int64_t min_bytes, int64_t cache_limit, bool huge_pages) {
  static std::mutex install_mu;
  std::lock_guard<std::mutex> g(install_mu);
  if (g_cache == nullptr) {
    c10::Allocator* previous = c10::GetCPUAllocator();
    if (previous == nullptr || previous->raw_deleter() == nullptr) return false;
    g_cache = new BlockCache();
    g_cache->previous_ = previous;
    g_cache->set_limits(min_bytes, cache_limit, huge_pages);
    pthread_atfork(&lock_before_fork, &unlock_after_fork, &unlock_after_fork);
    c10::SetCPUAllocator(g_cache, /*priority=*/1);
    return c10::GetCPUAllocator() == g_cache;
  }
  g_cache->set_limits(min_bytes, cache_limit, huge_pages);
  return c10::GetCPUAllocator() == g_cache;
}

bool block_cache_installed() { return g_cache != nullptr && c10::GetCPUAllocator() == g_cache; }

BlockCacheStats block_cache_stats() { return g_cache ? g_cache->stats() : BlockCacheStats{}; }

int64_t release_cached_blocks() { return g_cache ? g_cache->release_all() : 0; }

}  // namespace isda
