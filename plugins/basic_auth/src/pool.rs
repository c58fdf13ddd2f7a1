//! The module's global allocator: free lists by size class in front of the standard one.
//!
//! A request makes about five small allocations in the guest (the HTTP context, and one
//! buffer for each header value the host copies in through `proxy_on_memory_allocate`),
//! all freed when the request ends. Through std's allocator (dlmalloc behind three layers
//! of wrappers) each allocation and free pair costs about 280 instructions, 1,400 of the
//! 4,600 guest instructions of a request. Here a small block is popped from and pushed back
//! to a singly linked list: a handful of instructions.
//!
//! Blocks of at most [`MAX_SMALL`] bytes (alignment at most [`GRANULE`]) come in classes of
//! 16, 32, ... 256 bytes. A class's free list starts empty and is fed by carving blocks off
//! a chunk taken from the backing allocator; freed blocks go back to their class's list and
//! are never returned to the backing allocator, so the memory held is the peak of live
//! small blocks per class (a few KiB for this plugin). Anything larger or more aligned goes
//! straight to the backing allocator.
//!
//! The state is a plain cell with no lock: only sound where there is a single thread. The
//! `Sync` that `#[global_allocator]` needs is therefore implemented only for wasm32 built
//! without the atomics feature (Proxy-Wasm runs each instance on one thread); native unit
//! tests use a local pool.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout};
use std::cell::UnsafeCell;
use std::ptr;

/// Size step between classes, and the alignment every small block has.
pub const GRANULE: usize = 16;
const CLASSES: usize = 16;
/// Largest size served from the free lists.
pub const MAX_SMALL: usize = GRANULE * CLASSES;
/// Bytes taken from the backing allocator each time the carving space runs out.
const CHUNK: usize = 4096;

struct State {
    /// Head of each class's free list; each free block starts with the next one's address.
    free: [*mut u8; CLASSES],
    /// Uncarved space of the current chunk: `[next, end)`.
    next: *mut u8,
    end: *mut u8,
}

pub struct Pool<A> {
    backing: A,
    state: UnsafeCell<State>,
}

// SAFETY: a wasm32 module without the atomics feature has exactly one thread, so the pool's
// unsynchronised state can never be reached from two threads at once.
#[cfg(all(target_arch = "wasm32", not(target_feature = "atomics")))]
unsafe impl<A: Sync> Sync for Pool<A> {}

impl<A> Pool<A> {
    pub const fn new(backing: A) -> Self {
        Pool {
            backing,
            state: UnsafeCell::new(State {
                free: [ptr::null_mut(); CLASSES],
                next: ptr::null_mut(),
                end: ptr::null_mut(),
            }),
        }
    }
}

/// The class of a small layout, or `None` for one the backing allocator serves.
#[inline]
fn class_of(layout: Layout) -> Option<usize> {
    (layout.size() <= MAX_SMALL && layout.align() <= GRANULE)
        .then(|| layout.size().max(1).div_ceil(GRANULE) - 1)
}

impl<A: GlobalAlloc> Pool<A> {
    /// Carves one block of `class` off the current chunk, taking a new chunk when the
    /// current one has no room left (its remainder, under one block, is abandoned).
    #[cold]
    unsafe fn carve(&self, class: usize) -> *mut u8 {
        let size = (class + 1) * GRANULE;
        // SAFETY: one thread (see `Sync`), and no reference to the state outlives this call.
        let state = unsafe { &mut *self.state.get() };
        if (state.end as usize) - (state.next as usize) < size {
            // SAFETY: CHUNK is non-zero and GRANULE a power of two.
            let chunk = unsafe {
                self.backing
                    .alloc(Layout::from_size_align_unchecked(CHUNK, GRANULE))
            };
            if chunk.is_null() {
                return chunk;
            }
            state.next = chunk;
            // SAFETY: `chunk` is the start of a CHUNK-byte allocation.
            state.end = unsafe { chunk.add(CHUNK) };
        }
        let block = state.next;
        // SAFETY: at least `size` bytes remain between `next` and `end`.
        state.next = unsafe { block.add(size) };
        block
    }
}

// SAFETY: small blocks are GRANULE-aligned (chunks are, and block sizes are multiples of
// GRANULE) and at least as large as their class's largest size; a block is handed out at
// most once until it is freed, since it is either uncarved, on exactly one free list, or
// live. Everything else is the backing allocator's, called with the caller's layout.
unsafe impl<A: GlobalAlloc> GlobalAlloc for Pool<A> {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let Some(class) = class_of(layout) else {
            // SAFETY: the caller's contract is passed on.
            return unsafe { self.backing.alloc(layout) };
        };
        // SAFETY: one thread (see `Sync`); the reference ends before any other access.
        let free = unsafe { &mut (*self.state.get()).free[class] };
        let head = *free;
        if head.is_null() {
            // SAFETY: as above; `free` is not used after this call.
            return unsafe { self.carve(class) };
        }
        // SAFETY: a free block holds the address of the next free block of its class.
        *free = unsafe { head.cast::<*mut u8>().read() };
        head
    }

    #[inline]
    unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
        let Some(class) = class_of(layout) else {
            // SAFETY: a layout that is not small was served by the backing allocator.
            return unsafe { self.backing.dealloc(block, layout) };
        };
        // SAFETY: one thread; `block` is a live block of this class (the caller's contract),
        // aligned for and larger than a pointer, and no longer used by the caller.
        unsafe {
            let free = &mut (*self.state.get()).free[class];
            block.cast::<*mut u8>().write(*free);
            *free = block;
        }
    }

    unsafe fn realloc(&self, block: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `new_size` is non-zero and, rounded to the alignment, fits in an isize
        // (the caller's contract), so the layout is valid.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        match (class_of(layout), class_of(new_layout)) {
            (Some(old), Some(new)) if old == new => block,
            // SAFETY: both layouts belong to the backing allocator; the contract passes on.
            (None, None) => unsafe { self.backing.realloc(block, layout, new_size) },
            _ => {
                // SAFETY: alloc/dealloc with the caller's layouts; the copy is within both
                // blocks, which are distinct.
                unsafe {
                    let moved = self.alloc(new_layout);
                    if !moved.is_null() {
                        ptr::copy_nonoverlapping(block, moved, layout.size().min(new_size));
                        self.dealloc(block, layout);
                    }
                    moved
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::alloc::System;
    use std::collections::HashMap;

    fn layout(size: usize, align: usize) -> Layout {
        Layout::from_size_align(size, align).unwrap()
    }

    #[test]
    fn classes_round_up_to_the_granule_and_large_or_overaligned_layouts_go_through() {
        assert_eq!(class_of(layout(1, 1)), Some(0));
        assert_eq!(class_of(layout(16, 8)), Some(0));
        assert_eq!(class_of(layout(17, 1)), Some(1));
        assert_eq!(class_of(layout(256, 16)), Some(15));
        assert_eq!(class_of(layout(257, 1)), None);
        assert_eq!(class_of(layout(8, 32)), None);
    }

    /// Random allocations, reallocations and frees of many sizes: every live block keeps
    /// the bytes written into it, is aligned as asked, and no two live blocks overlap.
    #[test]
    fn live_blocks_keep_their_bytes_and_never_overlap() {
        let pool = Pool::new(System);
        let mut live: HashMap<usize, (Layout, u8)> = HashMap::new();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rand = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let fill = |p: *mut u8, l: Layout, tag: u8| unsafe { ptr::write_bytes(p, tag, l.size()) };
        let check = |p: *mut u8, l: Layout, tag: u8| {
            let bytes = unsafe { std::slice::from_raw_parts(p, l.size()) };
            assert!(
                bytes.iter().all(|&b| b == tag),
                "block at {p:?} lost its bytes"
            );
        };
        for step in 0..20_000u32 {
            let r = rand();
            let tag = (step % 251) as u8;
            let pick = live
                .keys()
                .nth((r >> 8) as usize % live.len().max(1))
                .copied();
            match (r % 4, pick) {
                (0 | 1, _) | (_, None) => {
                    let size = 1 + (r >> 16) as usize % 600;
                    let align = [1, 2, 8, 16, 32][(r >> 32) as usize % 5];
                    let l = layout(size, align);
                    let p = unsafe { pool.alloc(l) };
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "misaligned {l:?}");
                    fill(p, l, tag);
                    assert!(
                        live.insert(p as usize, (l, tag)).is_none(),
                        "handed out twice"
                    );
                }
                (2, Some(p)) => {
                    let (l, t) = live.remove(&p).unwrap();
                    check(p as *mut u8, l, t);
                    unsafe { pool.dealloc(p as *mut u8, l) };
                }
                (_, Some(p)) => {
                    let (l, t) = live.remove(&p).unwrap();
                    let new_size = 1 + (r >> 16) as usize % 600;
                    let q = unsafe { pool.realloc(p as *mut u8, l, new_size) };
                    assert!(!q.is_null());
                    let kept = layout(l.size().min(new_size), l.align());
                    check(q, kept, t);
                    let nl = layout(new_size, l.align());
                    fill(q, nl, tag);
                    assert!(
                        live.insert(q as usize, (nl, tag)).is_none(),
                        "handed out twice"
                    );
                }
            }
            if step % 1000 == 0 {
                let mut spans: Vec<(usize, usize)> =
                    live.iter().map(|(p, (l, _))| (*p, *p + l.size())).collect();
                spans.sort();
                for w in spans.windows(2) {
                    assert!(w[0].1 <= w[1].0, "live blocks overlap: {w:?}");
                }
                for (p, (l, t)) in &live {
                    check(*p as *mut u8, *l, *t);
                }
            }
        }
        for (p, (l, _)) in live {
            unsafe { pool.dealloc(p as *mut u8, l) };
        }
    }

    #[test]
    fn a_freed_small_block_is_reused_by_its_class() {
        let pool = Pool::new(System);
        let l = layout(24, 8);
        let a = unsafe { pool.alloc(l) };
        unsafe { pool.dealloc(a, l) };
        assert_eq!(
            unsafe { pool.alloc(layout(30, 4)) },
            a,
            "same class, same block"
        );
    }
}
