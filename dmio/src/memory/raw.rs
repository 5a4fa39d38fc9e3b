//! Owned, aligned memory for O_DIRECT: heap buffers, anonymous mappings and pages.
//!
//! This is the memory half of the crate's unsafe boundary. Every type here owns
//! its bytes, hands out slices only through `&self`/`&mut self` (so Rust's borrow
//! rules give exclusive access), is zero-filled when created (no uninitialised
//! byte is ever readable), and frees its memory exactly once in `Drop`.
#![allow(unsafe_code)]

use std::alloc::{self, Layout};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::Arc;

use super::PAGE_SIZE;
use super::page::PoolShared;

/// A contiguous heap buffer aligned for direct I/O, zero-filled on creation.
///
/// This is the owner behind [`DmIoMemory::Kmem`](crate::DmIoMemory::Kmem) (the
/// kernel's kmalloc'd memory). The address is aligned to `align` (at least 4096,
/// which satisfies every device's direct-I/O memory alignment up to one page).
/// [`PagePool::buffer`](crate::PagePool::buffer) also lends pages of a pool's
/// registered arena as `AlignedBuf`s, for fixed-buffer I/O; those go back to
/// the pool on drop.
///
/// ```
/// use dmio::AlignedBuf;
/// let mut buf = AlignedBuf::new(8192);
/// buf[..5].copy_from_slice(b"hello");
/// assert_eq!(buf.len(), 8192);
/// assert_eq!(buf.as_ptr() as usize % 4096, 0);
/// let copy = AlignedBuf::from_slice(b"any bytes at all");
/// assert_eq!(&copy[..], b"any bytes at all");
/// ```
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
    /// Set when the bytes are a page of a pool's arena (lent out by
    /// [`PagePool::buffer`](crate::PagePool::buffer)) rather than a heap
    /// allocation: the page goes back to the pool on drop.
    loan: Option<ArenaLoan>,
}

/// A page of a pool's arena lent to an [`AlignedBuf`].
struct ArenaLoan {
    pool: Arc<PoolShared>,
    index: u32,
}

// SAFETY: AlignedBuf owns its allocation exclusively (like a Box<[u8]>); moving it
// to another thread moves that ownership, and shared references only read.
unsafe impl Send for AlignedBuf {}
// SAFETY: `&AlignedBuf` only gives `&[u8]`, which is safe to share.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// The default alignment: one page, enough for any logical block size up to 4 KiB.
    pub const DEFAULT_ALIGN: usize = PAGE_SIZE;

    /// A zero-filled buffer of `len` bytes aligned to one page.
    ///
    /// # Panics
    ///
    /// Like `Vec::with_capacity`, panics if the size overflows (use
    /// [`try_new`](Self::try_new) to get an error instead); aborts if the
    /// allocation fails.
    pub fn new(len: usize) -> AlignedBuf {
        Self::with_alignment(len, Self::DEFAULT_ALIGN)
    }

    /// A zero-filled buffer of `len` bytes aligned to `align`, which is rounded up
    /// to a power of two no smaller than one page.
    ///
    /// # Panics
    ///
    /// As [`new`](Self::new).
    pub fn with_alignment(len: usize, align: usize) -> AlignedBuf {
        match Self::try_with_alignment(len, align) {
            Some(buf) => buf,
            None => panic!("AlignedBuf: capacity overflow ({len} bytes aligned to {align})"),
        }
    }

    /// Like [`new`](Self::new), but `None` when the size overflows.
    pub fn try_new(len: usize) -> Option<AlignedBuf> {
        Self::try_with_alignment(len, Self::DEFAULT_ALIGN)
    }

    /// Like [`with_alignment`](Self::with_alignment), but `None` when the size or
    /// the alignment overflows.
    pub fn try_with_alignment(len: usize, align: usize) -> Option<AlignedBuf> {
        let align = align.max(PAGE_SIZE).checked_next_power_of_two()?;
        // Round the capacity up to the alignment so that whole blocks can always be
        // transferred, and allocate at least one block (zero-sized layouts are not
        // allowed by the global allocator).
        let cap = len.max(1).checked_next_multiple_of(align)?;
        let layout = Layout::from_size_align(cap, align).ok()?;
        // SAFETY: the layout has a non-zero size: cap >= align >= 4096, computed
        // without overflow above.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else { alloc::handle_alloc_error(layout) };
        Some(AlignedBuf { ptr, len, layout, loan: None })
    }

    /// A zero-filled one-page buffer in a free page of `pool`'s arena, if one
    /// is free now. The page is the buffer's alone until it is dropped, which
    /// gives the page back.
    pub(crate) fn from_arena(pool: &Arc<PoolShared>) -> Option<AlignedBuf> {
        let layout = Layout::from_size_align(PAGE_SIZE, PAGE_SIZE).ok()?;
        let index = pool.take_index(None)?;
        let Some(ptr) = pool.arena().page_ptr(index as usize) else {
            pool.give_back(index);
            return None;
        };
        // SAFETY (aliasing): `index` came off the pool's free list, which holds
        // each index at most once, so no Page or other buffer refers to these
        // bytes until this buffer gives the index back in `drop`. The Arc to the
        // pool in the loan keeps the arena mapped meanwhile.
        let mut buf = AlignedBuf {
            ptr,
            len: PAGE_SIZE,
            layout,
            loan: Some(ArenaLoan { pool: pool.clone(), index }),
        };
        // A page comes back holding its last owner's bytes; a new AlignedBuf is
        // zero-filled.
        buf.fill(0);
        Some(buf)
    }

    /// Whether the bytes are a page of a pool's arena (see
    /// [`PagePool::buffer`](crate::PagePool::buffer)).
    pub fn is_pool_page(&self) -> bool {
        self.loan.is_some()
    }

    /// The address of the first byte (without borrowing the bytes).
    pub(crate) fn addr(&self) -> usize {
        self.ptr.as_ptr() as usize
    }

    /// A new aligned buffer holding a copy of `bytes` (any length, any alignment).
    pub fn from_slice(bytes: &[u8]) -> AlignedBuf {
        let mut buf = Self::new(bytes.len());
        buf.copy_from_slice(bytes);
        buf
    }

    /// The length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The alignment of the buffer's address.
    pub fn alignment(&self) -> usize {
        self.layout.align()
    }

    /// Changes the length within the allocated capacity (a multiple of the
    /// alignment); bytes exposed again keep whatever they last held.
    ///
    /// Returns `false`, changing nothing, when `len` exceeds the capacity.
    pub fn set_len(&mut self, len: usize) -> bool {
        if len > self.layout.size() {
            return false;
        }
        self.len = len;
        true
    }

    /// The allocated capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.layout.size()
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr points to `layout.size() >= len` initialised (zeroed) bytes
        // owned by self, alive for as long as the borrow of self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        match self.loan.take() {
            Some(loan) => loan.pool.give_back(loan.index),
            // SAFETY: without a loan, ptr was allocated in `try_with_alignment`
            // with exactly this layout and is freed only here, once.
            None => unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) },
        }
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("addr", &self.ptr)
            .field("len", &self.len)
            .field("align", &self.layout.align())
            .field("pool_page", &self.loan.is_some())
            .finish()
    }
}

/// An anonymous private memory mapping, page-aligned and zero-filled.
///
/// Owned by a [`VirtualArea`](crate::VirtualArea) (which reads and writes it
/// through `&self`/`&mut self`), or wrapped in an [`Arena`] for the page pool.
pub(crate) struct MmapBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: MmapBuf owns its mapping exclusively; see AlignedBuf.
unsafe impl Send for MmapBuf {}
// SAFETY: a shared MmapBuf only gives `&[u8]` (as_slice) or its address; the
// pool's arena, whose pages are written through `Page`s, is wrapped in `Arena`,
// which offers no slice at all.
unsafe impl Sync for MmapBuf {}

impl MmapBuf {
    /// Maps `len` bytes (rounded up to whole pages, at least one page).
    pub(crate) fn new(len: usize) -> std::io::Result<MmapBuf> {
        let len = len.max(1).checked_next_multiple_of(PAGE_SIZE).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "mapping size overflows")
        })?;
        // SAFETY: an anonymous private mapping with no address hint touches no
        // existing memory; the result is checked below.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ptr = NonNull::new(raw.cast::<u8>()).ok_or_else(|| std::io::Error::other("mmap"))?;
        Ok(MmapBuf { ptr, len })
    }

    /// The mapped length in bytes (a multiple of the page size).
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The start address.
    pub(crate) fn addr(&self) -> usize {
        self.ptr.as_ptr() as usize
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping is `len` readable, zero-initialised bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for MmapBuf {
    fn drop(&mut self) {
        // SAFETY: the mapping was created by `new` with this exact length and is
        // unmapped only here, once. Nothing borrows it any more (we hold &mut self),
        // and memory registered with a ring stays pinned by the kernel itself.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// The page pool's arena: a mapping whose pages are handed out one by one as
/// [`Page`]s and written through them. It deliberately offers no slice of the
/// whole mapping, which would alias the pages' exclusive access.
#[derive(Debug)]
pub(crate) struct Arena(MmapBuf);

impl Arena {
    /// Maps an arena of `pages` pages.
    pub(crate) fn new(pages: usize) -> std::io::Result<Arena> {
        let len = pages.checked_mul(PAGE_SIZE).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "arena size overflows")
        })?;
        MmapBuf::new(len).map(Arena)
    }

    /// The start address.
    pub(crate) fn addr(&self) -> usize {
        self.0.addr()
    }

    /// The length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    /// A raw pointer to page `index`.
    fn page_ptr(&self, index: usize) -> Option<NonNull<u8>> {
        let end = index.checked_add(1)?.checked_mul(PAGE_SIZE)?;
        if end > self.0.len {
            return None;
        }
        // SAFETY: index * PAGE_SIZE + PAGE_SIZE <= len, so the offset stays inside
        // the mapping.
        Some(unsafe { self.0.ptr.add(index * PAGE_SIZE) })
    }
}

impl fmt::Debug for MmapBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MmapBuf").field("addr", &self.ptr).field("len", &self.len).finish()
    }
}

/// One 4 KiB page of memory aligned to 4 KiB: the unit of [`PageList`](crate::PageList)
/// and [`Bvec`](crate::Bvec) memory.
///
/// A page comes from a [`PagePool`](crate::PagePool) (and goes back to it when
/// dropped) or stands alone ([`Page::new`]). It dereferences to `[u8]` of
/// [`PAGE_SIZE`](crate::PAGE_SIZE) bytes. New pages are zero-filled; a page reused
/// from a pool holds the bytes its previous owner left in it.
///
/// ```
/// let mut page = dmio::Page::new();
/// page[0] = 7;
/// assert_eq!(page.len(), dmio::PAGE_SIZE);
/// assert_eq!(page.as_ptr() as usize % dmio::PAGE_SIZE, 0);
/// ```
pub struct Page {
    ptr: NonNull<u8>,
    home: PageHome,
}

enum PageHome {
    /// A page of a pool's arena; `index` is returned to the pool's free list on drop.
    Arena { pool: Arc<PoolShared>, index: u32 },
    /// A heap page, counted against its pool (if any) while alive.
    Heap { _buf: AlignedBuf, pool: Option<Arc<PoolShared>> },
}

// SAFETY: a Page owns its 4 KiB exclusively: arena pages are handed out once per
// free-list entry (see `from_arena`), heap pages own their AlignedBuf. The
// Arc<PoolShared> it carries is Send + Sync.
unsafe impl Send for Page {}
// SAFETY: `&Page` only gives `&[u8]`.
unsafe impl Sync for Page {}

impl Page {
    /// A stand-alone zero-filled page, not tied to any pool.
    pub fn new() -> Page {
        Self::from_heap(None)
    }

    /// A zero-filled heap page, counted against `pool` until dropped.
    pub(crate) fn from_heap(pool: Option<Arc<PoolShared>>) -> Page {
        let mut buf = AlignedBuf::new(PAGE_SIZE);
        let ptr = NonNull::new(buf.as_mut_ptr()).unwrap_or(NonNull::dangling());
        Page { ptr, home: PageHome::Heap { _buf: buf, pool } }
    }

    /// Takes a free page of `pool`'s arena, waiting up to `wait` for one.
    pub(crate) fn from_arena(
        pool: &Arc<PoolShared>,
        wait: Option<std::time::Duration>,
    ) -> Option<Page> {
        let index = pool.take_index(wait)?;
        let Some(ptr) = pool.arena().page_ptr(index as usize) else {
            pool.give_back(index);
            return None;
        };
        // SAFETY (aliasing): `index` came off the pool's free list, which holds
        // each index at most once, so this is the only live Page for it until it
        // is dropped and gives the index back.
        Some(Page { ptr, home: PageHome::Arena { pool: pool.clone(), index } })
    }
}

impl Page {
    /// The address of the page (without borrowing its bytes).
    pub(crate) fn addr(&self) -> usize {
        self.ptr.as_ptr() as usize
    }
}

impl Default for Page {
    fn default() -> Self {
        Page::new()
    }
}

impl Deref for Page {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr names PAGE_SIZE initialised bytes owned by this page (its
        // AlignedBuf, or its exclusively owned arena page kept mapped by the Arc to
        // the pool), alive for the borrow of self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), PAGE_SIZE) }
    }
}

impl DerefMut for Page {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`; `&mut self` makes the access exclusive and no other
        // Page refers to the same bytes.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), PAGE_SIZE) }
    }
}

impl Drop for Page {
    fn drop(&mut self) {
        match &self.home {
            PageHome::Arena { pool, index } => pool.give_back(*index),
            PageHome::Heap { pool: Some(pool), .. } => pool.heap_page_dropped(),
            PageHome::Heap { pool: None, .. } => {}
        }
    }
}

impl fmt::Debug for Page {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.home {
            PageHome::Arena { index, .. } => format!("arena page {index}"),
            PageHome::Heap { .. } => "heap page".to_string(),
        };
        f.debug_struct("Page").field("addr", &self.ptr).field("kind", &kind).finish()
    }
}
