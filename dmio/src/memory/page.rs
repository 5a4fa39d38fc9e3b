//! The page pool: aligned pages with a reserve, the analogue of the kernel's mempool.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, bounded};

use super::raw::{AlignedBuf, Arena, Page};
use super::{PAGE_SIZE, PageList};

/// Shared state of a pool: the arena of reserved pages and its free list.
pub(crate) struct PoolShared {
    arena: Arena,
    reserve: usize,
    free_tx: Sender<u32>,
    free_rx: Receiver<u32>,
    /// Pages allocated from the heap beyond the reserve and still alive.
    heap_pages: AtomicUsize,
    max_heap_pages: usize,
}

impl PoolShared {
    pub(crate) fn arena(&self) -> &Arena {
        &self.arena
    }

    /// Takes an index off the free list, waiting up to `wait` (not at all if `None`).
    pub(crate) fn take_index(&self, wait: Option<Duration>) -> Option<u32> {
        match wait {
            None => self.free_rx.try_recv().ok(),
            Some(d) => self.free_rx.recv_timeout(d).ok(),
        }
    }

    pub(crate) fn give_back(&self, index: u32) {
        // The channel has room for every index, so this never blocks; it can only
        // fail if the receiver is gone, which cannot happen while `self` is alive.
        let _ = self.free_tx.try_send(index);
    }

    pub(crate) fn heap_page_dropped(&self) {
        self.heap_pages.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A pool of 4 KiB-aligned [`Page`]s with a guaranteed reserve.
///
/// The reserve is one contiguous arena of `reserve` pages, allocated up front and
/// (when the pool belongs to a [`DmIoClient`](crate::DmIoClient)) registered with
/// its io_uring so that single-page and contiguous transfers use the fixed-buffer
/// opcodes. Beyond the reserve, the pool may hand out up to `extra` heap pages.
///
/// Like the kernel's mempool, [`alloc`](PagePool::alloc) never fails: when every
/// page is in use it waits for one to come back (pages return when dropped). This
/// is the forward-progress guarantee: a user that needs at most `reserve` pages at
/// a time always makes progress. [`try_alloc`](PagePool::try_alloc) does not wait.
///
/// Cloning a `PagePool` gives another handle to the same pool.
///
/// ```
/// use dmio::PagePool;
/// let pool = PagePool::new(4, 0).unwrap();
/// let a = pool.alloc();
/// let list = pool.alloc_list(3); // takes the rest of the reserve
/// assert_eq!(list.len(), 3 * dmio::PAGE_SIZE);
/// assert!(pool.try_alloc().is_none()); // reserve exhausted, no extra pages allowed
/// drop(a);
/// assert!(pool.try_alloc().is_some());
/// ```
#[derive(Clone)]
pub struct PagePool {
    shared: Arc<PoolShared>,
}

impl PagePool {
    /// A pool with `reserve` pages in its arena and up to `extra` more heap pages.
    pub fn new(reserve: usize, extra: usize) -> std::io::Result<PagePool> {
        let reserve = reserve.max(1);
        let count = u32::try_from(reserve).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "reserve too large")
        })?;
        let arena = Arena::new(reserve)?;
        let (free_tx, free_rx) = bounded(reserve);
        for index in 0..count {
            let _ = free_tx.try_send(index);
        }
        Ok(PagePool {
            shared: Arc::new(PoolShared {
                arena,
                reserve,
                free_tx,
                free_rx,
                heap_pages: AtomicUsize::new(0),
                max_heap_pages: extra,
            }),
        })
    }

    /// The number of pages in the reserve (the arena).
    pub fn reserve(&self) -> usize {
        self.shared.reserve
    }

    /// The number of reserve pages not in use right now.
    pub fn free_reserve_pages(&self) -> usize {
        self.shared.free_rx.len()
    }

    /// The number of heap pages beyond the reserve that are in use right now.
    pub fn extra_pages_in_use(&self) -> usize {
        self.shared.heap_pages.load(Ordering::Acquire)
    }

    /// Takes a page, waiting for one to be returned if none is available.
    ///
    /// Do not call this from a dm-io notify callback: pages come back only when
    /// requests complete, which needs the completion thread the callback runs on.
    /// Use [`try_alloc`](Self::try_alloc) there.
    pub fn alloc(&self) -> Page {
        loop {
            if let Some(page) = self.try_alloc() {
                return page;
            }
            // Wait for a reserve page to come back. A timeout lets a heap page that
            // was freed meanwhile be picked up too.
            if let Some(page) = Page::from_arena(&self.shared, Some(Duration::from_millis(10))) {
                return page;
            }
        }
    }

    /// Takes a page if one is available now.
    pub fn try_alloc(&self) -> Option<Page> {
        if let Some(page) = Page::from_arena(&self.shared, None) {
            return Some(page);
        }
        let heap = &self.shared.heap_pages;
        let mut current = heap.load(Ordering::Acquire);
        while current < self.shared.max_heap_pages {
            match heap.compare_exchange(current, current + 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Some(Page::from_heap(Some(self.shared.clone()))),
                Err(now) => current = now,
            }
        }
        None
    }

    /// A zero-filled buffer of `len` bytes for I/O: a free page of the reserve
    /// when `len` fits in one page and one is free now, otherwise a heap
    /// [`AlignedBuf`]. Never waits.
    ///
    /// A client's pool ([`DmIoClient::page_pool`](crate::DmIoClient::page_pool))
    /// is registered with its ring, so transfers to or from a buffer in the
    /// reserve use io_uring's fixed-buffer opcodes, which skip pinning the
    /// memory on every I/O. Worth it for buffers reused across many I/Os; the
    /// page goes back to the pool when the buffer is dropped. Heap buffers
    /// from here are not counted against the pool's extra pages.
    ///
    /// ```
    /// use dmio::PagePool;
    /// let pool = PagePool::new(1, 0).unwrap();
    /// let a = pool.buffer(4096);
    /// assert!(a.is_pool_page() && a.iter().all(|&b| b == 0));
    /// let b = pool.buffer(512); // the reserve is lent out: a heap buffer
    /// assert!(!b.is_pool_page() && b.len() == 512);
    /// drop(a);
    /// assert!(pool.buffer(8192).len() == 8192); // larger than a page: heap
    /// assert!(pool.buffer(4096).is_pool_page()); // the page came back
    /// ```
    pub fn buffer(&self, len: usize) -> AlignedBuf {
        if len <= PAGE_SIZE
            && let Some(mut buf) = AlignedBuf::from_arena(&self.shared)
        {
            buf.set_len(len);
            return buf;
        }
        AlignedBuf::new(len)
    }

    /// Takes `n` pages (waiting as [`alloc`](PagePool::alloc) does) as a page list
    /// starting at offset 0.
    pub fn alloc_list(&self, n: usize) -> PageList {
        let mut pages = Vec::with_capacity(n);
        for _ in 0..n {
            pages.push(self.alloc());
        }
        PageList::new(pages)
    }

    /// The arena's address range, for registration with a ring.
    pub(crate) fn arena_range(&self) -> (usize, usize) {
        (self.shared.arena.addr(), self.shared.arena.len())
    }
}

impl fmt::Debug for PagePool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PagePool")
            .field("reserve", &self.shared.reserve)
            .field("free_reserve_pages", &self.free_reserve_pages())
            .field("extra_pages_in_use", &self.extra_pages_in_use())
            .field("max_extra_pages", &self.shared.max_heap_pages)
            .finish()
    }
}
