//! Giving the heap that compilation used back to the kernel.
//!
//! Compiling a module with cranelift allocates tens of MiB and frees them when it is done.
//! glibc keeps freed memory in the compiling thread's arena, still resident: with 10 plugins
//! that was ~6 MiB of a 51 MiB proxy (`scripts/bench.sh`, "RSS with 10 plugins"). Trimming
//! once after a config that compiled something returns those pages.

/// Returns free heap pages of every arena to the kernel (glibc's `malloc_trim`); a no-op on
/// other C libraries.
pub fn release_freed_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    trim();
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn trim() {
    // SAFETY: `malloc_trim` takes no pointers, is thread-safe in glibc, and only releases
    // memory malloc holds as free; no allocation is moved or invalidated.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    fn rss_anon_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("RssAnon:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    #[test]
    fn freed_heap_pages_go_back_and_live_allocations_stay_intact() {
        // 64 MiB in chunks below the mmap threshold, touched, then freed under a live
        // allocation made after them: glibc keeps those pages resident until trimmed.
        let chunks: Vec<Vec<u8>> = (0..1024).map(|i| vec![i as u8 | 1; 64 << 10]).collect();
        let sentinel = vec![7u8; 1024];
        let keep: Vec<u8> = chunks[0].clone();
        drop(chunks);
        let before = rss_anon_kib();
        super::release_freed_heap();
        let after = rss_anon_kib();
        assert!(
            before.saturating_sub(after) >= 32 << 10,
            "RssAnon {before} KiB before the trim, {after} KiB after"
        );
        assert!(sentinel.iter().all(|b| *b == 7) && keep.iter().all(|b| *b == 1));
    }
}
