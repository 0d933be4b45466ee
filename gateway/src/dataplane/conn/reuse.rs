//! Per-request memory a worker thread reuses instead of allocating it afresh for every
//! keep-alive request: the heap block a request's future lives in ([`PooledFuture`]) and
//! the head buffer a request is read into ([`take_head_buf`], [`give_back_head_buf`]).
//!
//! Both are the two allocations a plaintext keep-alive request made (measured with a
//! `perf probe` on `malloc`, docs/benchmarks.md "Keep-alive, third pass"). An idle
//! connection still holds neither: it gives both back to its worker's cache when its
//! request ends, and the next request of any connection of that worker takes them. Each
//! worker is one thread, so a thread-local cache is the worker's cache; each keeps at most
//! [`KEPT`] entries, so what it holds is bounded by the requests that ran at once.

use bytes::BytesMut;
use std::alloc::Layout;
use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::ptr::NonNull;
use std::task::{Context, Poll};

/// Entries kept per cache per worker: as many as requests run at once, typically; beyond
/// that, what comes back is freed.
const KEPT: usize = 256;

/// A head buffer grown past this (a large head) is freed, not kept: the cache holds only
/// buffers of the size a typical head needs.
const HEAD_BUF_KEPT_CAPACITY: usize = 4 * crate::dataplane::ctx::HEAD_BUF_SIZE;

/// Free heap blocks by layout; freed when the thread ends.
struct Blocks(Vec<(Layout, NonNull<u8>)>);

impl Drop for Blocks {
    fn drop(&mut self) {
        for (layout, ptr) in self.0.drain(..) {
            // SAFETY: every block here came from `alloc` with this layout and is unused.
            unsafe { std::alloc::dealloc(ptr.as_ptr(), layout) };
        }
    }
}

thread_local! {
    static BLOCKS: RefCell<Blocks> = const { RefCell::new(Blocks(Vec::new())) };
    static HEAD_BUFS: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
}

/// A block of `layout` (never zero-sized) from the cache, or newly allocated.
fn take_block(layout: Layout) -> NonNull<u8> {
    let cached = BLOCKS
        .try_with(|b| {
            let list = &mut b.borrow_mut().0;
            // One connection's requests all have the same future type: the last block
            // given back almost always fits.
            let at = list.iter().rposition(|(l, _)| *l == layout)?;
            Some(list.swap_remove(at).1)
        })
        .ok()
        .flatten();
    cached.unwrap_or_else(|| {
        // SAFETY: `layout` has a non-zero size (checked by the caller).
        let ptr = unsafe { std::alloc::alloc(layout) };
        NonNull::new(ptr).unwrap_or_else(|| std::alloc::handle_alloc_error(layout))
    })
}

/// Back to the cache, or freed when it is full (or the thread is ending).
fn give_back_block(layout: Layout, ptr: NonNull<u8>) {
    let kept = BLOCKS
        .try_with(|b| {
            let list = &mut b.borrow_mut().0;
            if list.len() < KEPT {
                list.push((layout, ptr));
                true
            } else {
                false
            }
        })
        .unwrap_or(false);
    if !kept {
        // SAFETY: allocated by `take_block` with this layout; nothing refers to it now.
        unsafe { std::alloc::dealloc(ptr.as_ptr(), layout) };
    }
}

/// A future on the heap, in a block from the worker's cache: `Box::pin` without the
/// allocation (and without the copy of the future from the stack, like `Box::write`).
pub(crate) struct PooledFuture<F> {
    ptr: NonNull<F>,
}

impl<F: Future> PooledFuture<F> {
    /// Builds the future `make` returns straight in its block.
    #[inline(always)]
    pub(crate) fn new(make: impl FnOnce() -> F) -> Self {
        let layout = Layout::new::<F>();
        if layout.size() == 0 {
            // Nothing to allocate (no async fn's future is this small; kept correct anyway).
            let ptr = NonNull::<F>::dangling();
            // SAFETY: a dangling, aligned pointer is valid for writes of a zero-sized type.
            unsafe { ptr.as_ptr().write(make()) };
            return PooledFuture { ptr };
        }
        let ptr = take_block(layout).cast::<F>();
        // SAFETY: the block is unused, with `F`'s size and alignment.
        unsafe { ptr.as_ptr().write(make()) };
        PooledFuture { ptr }
    }
}

impl<F: Future> Future for PooledFuture<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // SAFETY: the future lives in its block until `drop`, which drops it in place:
        // it never moves, so it is pinned for as long as this handle is (which is `Unpin`).
        unsafe { Pin::new_unchecked(&mut *self.ptr.as_ptr()) }.poll(cx)
    }
}

impl<F> Drop for PooledFuture<F> {
    fn drop(&mut self) {
        // SAFETY: the future was written in `new` and is dropped once, here.
        unsafe { std::ptr::drop_in_place(self.ptr.as_ptr()) };
        let layout = Layout::new::<F>();
        if layout.size() != 0 {
            give_back_block(layout, self.ptr.cast());
        }
    }
}

/// A head buffer with room for a typical head: from the cache, or newly allocated.
pub(crate) fn take_head_buf() -> BytesMut {
    let cached = HEAD_BUFS.try_with(|b| b.borrow_mut().pop()).ok().flatten();
    cached.unwrap_or_else(|| BytesMut::with_capacity(crate::dataplane::ctx::HEAD_BUF_SIZE))
}

/// An emptied head buffer back to the cache: kept when its storage is its own (not shared
/// with a piece split off it) and not grown past [`HEAD_BUF_KEPT_CAPACITY`].
pub(crate) fn give_back_head_buf(mut buf: BytesMut) {
    buf.clear();
    // Moves the start back to the beginning of its storage (no allocation, no copy of an
    // empty buffer), so `capacity` is all of it; false when the storage is shared.
    if buf.capacity() == 0
        || !buf.try_reclaim(crate::dataplane::ctx::HEAD_BUF_SIZE)
        || buf.capacity() > HEAD_BUF_KEPT_CAPACITY
    {
        return;
    }
    let _ = HEAD_BUFS.try_with(|b| {
        let mut b = b.borrow_mut();
        if b.len() < KEPT {
            b.push(buf);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Counted(std::rc::Rc<std::cell::Cell<u32>>, [u8; 512]);
    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.set(self.0.get() + 1);
        }
    }

    /// One future type for both uses below, as one connection's requests have.
    async fn read_at(c: Counted, i: usize) -> u8 {
        c.1[i]
    }

    fn head_bufs_kept() -> usize {
        HEAD_BUFS.with(|b| b.borrow().len())
    }

    #[test]
    fn a_future_block_is_reused_and_its_future_dropped() {
        let dropped = std::rc::Rc::new(std::cell::Cell::new(0));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let c = Counted(dropped.clone(), [1; 512]);
        let f = PooledFuture::new(|| read_at(c, 511));
        let first_block = f.ptr.as_ptr() as usize;
        assert_eq!(rt.block_on(f), 1);
        // Run to completion: the captured value went with the future.
        assert_eq!(dropped.get(), 1);
        // The next one gets the same block; dropped unpolled, its captured value is
        // dropped too.
        let c = Counted(dropped.clone(), [2; 512]);
        let f = PooledFuture::new(|| read_at(c, 0));
        assert_eq!(f.ptr.as_ptr() as usize, first_block);
        drop(f);
        assert_eq!(dropped.get(), 2);
    }

    #[test]
    fn head_buffers_are_reused_unless_grown_or_shared() {
        let mut b = take_head_buf();
        b.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        let at = b.as_ptr() as usize;
        let n = b.len();
        bytes::Buf::advance(&mut b, n);
        give_back_head_buf(b);
        assert_eq!(head_bufs_kept(), 1);
        let b = take_head_buf();
        assert_eq!(b.as_ptr() as usize, at, "the same storage, from its start");
        assert!(b.capacity() >= crate::dataplane::ctx::HEAD_BUF_SIZE);
        assert_eq!(head_bufs_kept(), 0);

        let mut big = BytesMut::with_capacity(HEAD_BUF_KEPT_CAPACITY * 2);
        big.extend_from_slice(&[0; 100]);
        give_back_head_buf(big);
        assert_eq!(head_bufs_kept(), 0, "a grown buffer is freed");

        let mut shared = take_head_buf();
        shared.extend_from_slice(&[0; 100]);
        let piece = shared.split_off(50);
        give_back_head_buf(shared);
        assert_eq!(
            head_bufs_kept(),
            0,
            "a buffer sharing its storage is not kept"
        );
        drop((b, piece));
    }
}
