// A CPU allocator for PyTorch that caches large blocks (isda._cpu_cache).
//
// glibc serves tensors from one heap (with mmap off, as the "keep" policy sets) or maps and
// unmaps every large block (its default). The heap fragments: small long-lived objects land
// between large transient tensors, and ISDA's training peak RSS was 1.6-2 GB above its live
// tensor bytes. mmap per block costs page faults and zeroing in every iteration (+35 % step
// time). This allocator keeps the two apart: blocks of at least `min_bytes` are mapped on their
// own, rounded up to a size class (eighths of a power of two: at most 12.5 % slack), and kept
// on free for the next request of that class or of a class up to 25 % smaller; a request of
// another class takes the pages of idle blocks (one larger block split, its tail left idle, or
// smaller ones moved together), so the process grows only when nothing idle is left and keeps
// its resident pages; blocks idle in the cache beyond `cache_limit` bytes go back to the
// system, least recently freed first.
// Smaller blocks go to the allocator that was installed before (torch's default).
#pragma once

#include <c10/core/Allocator.h>

#include <cstddef>
#include <cstdint>

namespace isda {

struct BlockCacheStats {
  int64_t in_use_bytes = 0;      // large blocks handed out and not yet freed (class sizes)
  int64_t cached_bytes = 0;      // large blocks idle in the cache
  int64_t peak_in_use_bytes = 0;
  int64_t hits = 0;              // large requests served from the cache
  int64_t misses = 0;            // large requests that mapped a new block
  int64_t released = 0;          // cached blocks returned to the system
  int64_t repurposed = 0;        // misses served (in part) by idle blocks of other classes
  int64_t min_bytes = 0;
  int64_t cache_limit = 0;
  bool huge_pages = false;       // new blocks >= 2 MB advised to use transparent huge pages
};

// Size class of a request of `n` bytes (n >= 4096): n rounded up to a multiple of an eighth of
// the largest power of two <= n, and to whole pages.
size_t block_class_size(size_t n);

// Installs the caching allocator as torch's CPU allocator (once per process; later calls only
// change the settings, for blocks mapped from then on). Returns true when it is (already)
// installed.
bool install_block_cache(int64_t min_bytes, int64_t cache_limit, bool huge_pages);
bool block_cache_installed();
BlockCacheStats block_cache_stats();
// Returns every idle cached block to the system; returns the bytes released.
int64_t release_cached_blocks();

}  // namespace isda
