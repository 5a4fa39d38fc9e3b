//! Memory for requests: page lists, bio vectors, virtual areas and contiguous
//! buffers, each owning its bytes.
//!
//! An asynchronous request takes its [`DmIoMemory`] by value and hands it back in
//! its [`DmIoCompletion`](crate::DmIoCompletion), so no buffer can be freed or
//! touched while the kernel still reads or writes it.

mod page;
pub(crate) mod raw;

use std::fmt;

pub use page::PagePool;
pub use raw::{AlignedBuf, Page};

use crate::error::DmIoError;
use raw::MmapBuf;

/// The size of a [`Page`]: 4 KiB on every architecture (independent of the CPU's
/// page size), which is also the largest direct-I/O memory alignment this crate
/// supports.
pub const PAGE_SIZE: usize = 4096;

/// A list of pages, read or written in order, starting `offset` bytes into the
/// first page: the kernel's `DM_IO_PAGE_LIST` (`struct page_list` plus
/// `dm_io_memory.offset`).
///
/// ```
/// use dmio::{PageList, Page};
/// let list = PageList::with_offset(vec![Page::new(), Page::new()], 512);
/// assert_eq!(list.len(), 2 * 4096 - 512);
/// ```
#[derive(Debug, Default)]
pub struct PageList {
    /// The pages, in I/O order.
    pub pages: Vec<Page>,
    /// Where the data starts in the first page, in bytes.
    pub offset: usize,
}

impl PageList {
    /// A page list starting at the beginning of the first page.
    pub fn new(pages: Vec<Page>) -> PageList {
        PageList { pages, offset: 0 }
    }

    /// A page list starting `offset` bytes into the first page.
    pub fn with_offset(pages: Vec<Page>, offset: usize) -> PageList {
        PageList { pages, offset }
    }

    /// The number of usable bytes: all pages minus the start offset.
    pub fn len(&self) -> usize {
        (self.pages.len() * PAGE_SIZE).saturating_sub(self.offset)
    }

    /// Whether the list holds no usable bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One segment of a bio vector: `len` bytes at `offset` within `page` (the
/// kernel's `struct bio_vec`).
#[derive(Debug)]
pub struct BioVec {
    page: Page,
    offset: u32,
    len: u32,
}

impl BioVec {
    /// A segment of `len` bytes at `offset` in `page`; the segment must lie within
    /// the page and must not be empty.
    pub fn new(page: Page, offset: usize, len: usize) -> Result<BioVec, DmIoError> {
        if len == 0 || offset.checked_add(len).is_none_or(|end| end > PAGE_SIZE) {
            return Err(DmIoError::BadSegment { offset, len });
        }
        Ok(BioVec { page, offset: offset as u32, len: len as u32 })
    }

    /// A segment covering a whole page.
    pub fn whole(page: Page) -> BioVec {
        BioVec { page, offset: 0, len: PAGE_SIZE as u32 }
    }

    /// The page.
    pub fn page(&self) -> &Page {
        &self.page
    }

    /// The page, mutably (to fill it before a write or read it after a read).
    pub fn page_mut(&mut self) -> &mut Page {
        &mut self.page
    }

    /// The segment's offset within its page.
    pub fn offset(&self) -> usize {
        self.offset as usize
    }

    /// The segment's length in bytes.
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// Always false: segments are never empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The segment's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.page[self.offset()..self.offset() + self.len()]
    }

    /// The segment's bytes, mutably.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        let (start, end) = (self.offset(), self.offset() + self.len());
        &mut self.page[start..end]
    }

    /// Gives the page back.
    pub fn into_page(self) -> Page {
        self.page
    }
}

/// A bio vector: a list of (page, offset, length) segments, read or written in
/// order (the kernel's `DM_IO_BIO`, formerly `DM_IO_BVEC`).
///
/// ```
/// use dmio::{Bvec, BioVec, Page};
/// let bvec = Bvec::new(vec![
///     BioVec::new(Page::new(), 1024, 2048).unwrap(),
///     BioVec::whole(Page::new()),
/// ]);
/// assert_eq!(bvec.len(), 2048 + 4096);
/// ```
#[derive(Debug, Default)]
pub struct Bvec {
    /// The segments, in I/O order.
    pub segments: Vec<BioVec>,
}

impl Bvec {
    /// A bio vector of these segments.
    pub fn new(segments: Vec<BioVec>) -> Bvec {
        Bvec { segments }
    }

    /// The total length of all segments.
    pub fn len(&self) -> usize {
        self.segments.iter().map(BioVec::len).sum()
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A large virtually contiguous area backed by an anonymous memory mapping (the
/// kernel's vmalloc'd `DM_IO_VMA`), zero-filled when created.
///
/// ```
/// let mut area = dmio::VirtualArea::new(1 << 20).unwrap();
/// area[4096] = 1;
/// assert_eq!(area.len(), 1 << 20);
/// ```
pub struct VirtualArea {
    map: MmapBuf,
    len: usize,
}

impl VirtualArea {
    /// Maps a zero-filled area of `len` bytes (the mapping is rounded up to whole pages).
    pub fn new(len: usize) -> std::io::Result<VirtualArea> {
        Ok(VirtualArea { map: MmapBuf::new(len)?, len })
    }

    /// The length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the area is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The address of the first byte (without borrowing the bytes).
    fn addr(&self) -> usize {
        self.map.addr()
    }
}

impl std::ops::Deref for VirtualArea {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.map.as_slice()[..self.len]
    }
}

impl std::ops::DerefMut for VirtualArea {
    fn deref_mut(&mut self) -> &mut [u8] {
        let len = self.len;
        &mut self.map.as_mut_slice()[..len]
    }
}

impl fmt::Debug for VirtualArea {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VirtualArea").field("map", &self.map).field("len", &self.len).finish()
    }
}

/// The memory of a request (the kernel's `struct dm_io_memory`), owning its bytes.
///
/// Reads fill it from the start; a write sends the same bytes, from the start, to
/// every region (a region shorter than the memory writes a prefix). Data-less
/// requests (flush, discard, write-zeroes) take no memory.
///
/// ```
/// use dmio::{DmIoMemory, AlignedBuf};
/// let mut mem = DmIoMemory::Kmem(AlignedBuf::from_slice(&[0xab; 4096]));
/// let mut out = [0u8; 16];
/// mem.copy_to_slice(100, &mut out);
/// assert_eq!(out, [0xab; 16]);
/// mem.copy_from_slice(0, b"head");
/// assert_eq!(mem.to_vec()[..4], *b"head");
/// ```
#[derive(Debug)]
pub enum DmIoMemory {
    /// A list of pages with a start offset (`DM_IO_PAGE_LIST`).
    PageList(PageList),
    /// A vector of (page, offset, length) segments (`DM_IO_BIO`).
    Bvec(Bvec),
    /// A large mmap-backed virtual area (`DM_IO_VMA`).
    Vma(VirtualArea),
    /// A contiguous aligned buffer (`DM_IO_KMEM`).
    Kmem(AlignedBuf),
    /// `len` bytes of zeros for writes, backed by one process-wide zeroed area
    /// that every request shares (the kernel's zero page, as `dm_kcopyd_zero`
    /// uses it). Nothing is allocated per request.
    ///
    /// This memory is write-only: a read into it is rejected with
    /// [`DmIoError::ReadIntoZeroes`], and the mutating helpers
    /// ([`copy_from_slice`](Self::copy_from_slice), [`zero_range`](Self::zero_range),
    /// [`for_each_slice_mut`](Self::for_each_slice_mut)) leave it unchanged.
    ///
    /// ```
    /// use dmio::DmIoMemory;
    /// let zeros = DmIoMemory::Zeroes(3 << 20);
    /// assert_eq!(zeros.len(), 3 << 20);
    /// assert!(zeros.to_vec().iter().all(|&b| b == 0));
    /// ```
    Zeroes(usize),
}

/// The size of the shared zero area behind [`DmIoMemory::Zeroes`]; longer runs
/// repeat it. 1 MiB keeps a whole default-sized operation in one iovec.
pub(crate) const ZERO_AREA_BYTES: usize = 1 << 20;

/// The shared zero area, allocated on first use and never freed (its pages are
/// never written, so they stay shared zero pages and cost no memory).
fn zero_area() -> &'static AlignedBuf {
    static AREA: std::sync::OnceLock<AlignedBuf> = std::sync::OnceLock::new();
    AREA.get_or_init(|| AlignedBuf::new(ZERO_AREA_BYTES))
}

/// Where a walk over a bio vector stopped, so that splitting a region into many
/// operations does not rescan the segments from the start each time.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct MemCursor {
    segment: usize,
    segment_start: u64,
}

impl DmIoMemory {
    /// The length in bytes.
    pub fn len(&self) -> usize {
        match self {
            DmIoMemory::PageList(p) => p.len(),
            DmIoMemory::Bvec(b) => b.len(),
            DmIoMemory::Vma(v) => v.len(),
            DmIoMemory::Kmem(k) => k.len(),
            DmIoMemory::Zeroes(len) => *len,
        }
    }

    /// Whether the memory holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The kernel's name for this memory type.
    pub fn kind_name(&self) -> &'static str {
        match self {
            DmIoMemory::PageList(_) => "page list",
            DmIoMemory::Bvec(_) => "bio vector",
            DmIoMemory::Vma(_) => "virtual area",
            DmIoMemory::Kmem(_) => "contiguous buffer",
            DmIoMemory::Zeroes(_) => "zero memory",
        }
    }

    /// Calls `f(index, address, length, position)` for each segment in I/O order,
    /// where `position` is the segment's byte offset within the memory.
    pub(crate) fn for_each_segment(&self, mut f: impl FnMut(usize, usize, usize, u64)) {
        match self {
            DmIoMemory::PageList(list) => {
                let mut pos = 0u64;
                let mut skip = list.offset;
                for (i, page) in list.pages.iter().enumerate() {
                    if skip >= PAGE_SIZE {
                        skip -= PAGE_SIZE;
                        continue;
                    }
                    let len = PAGE_SIZE - skip;
                    f(i, page.addr() + skip, len, pos);
                    pos += len as u64;
                    skip = 0;
                }
            }
            DmIoMemory::Bvec(bvec) => {
                let mut pos = 0u64;
                for (i, seg) in bvec.segments.iter().enumerate() {
                    f(i, seg.page.addr() + seg.offset(), seg.len(), pos);
                    pos += seg.len() as u64;
                }
            }
            DmIoMemory::Vma(v) => f(0, v.addr(), v.len(), 0),
            DmIoMemory::Kmem(k) => f(0, k.addr(), k.len(), 0),
            DmIoMemory::Zeroes(len) => {
                let base = zero_area().addr();
                let mut pos = 0;
                let mut i = 0;
                while pos < *len {
                    let n = (*len - pos).min(ZERO_AREA_BYTES);
                    f(i, base, n, pos as u64);
                    pos += n;
                    i += 1;
                }
            }
        }
    }

    /// Appends iovecs covering `len` bytes starting at byte `start` of the memory,
    /// merging physically adjacent segments, until `len` is covered or `iov` holds
    /// `max_iov` entries. Returns the number of bytes covered.
    ///
    /// Only addresses are taken, never references to the bytes: earlier
    /// operations of the same request may be transferring into other parts of the
    /// memory meanwhile. The request owns the memory, so nothing else touches it.
    pub(crate) fn gather(
        &self,
        start: u64,
        len: u64,
        cursor: &mut MemCursor,
        iov: &mut Vec<libc::iovec>,
        max_iov: usize,
    ) -> u64 {
        let mut covered = 0u64;
        let push = |iov: &mut Vec<libc::iovec>, addr: usize, n: usize| -> bool {
            if let Some(last) = iov.last_mut()
                && last.iov_base as usize + last.iov_len == addr
            {
                last.iov_len += n;
                return true;
            }
            if iov.len() >= max_iov {
                return false;
            }
            iov.push(libc::iovec { iov_base: addr as *mut libc::c_void, iov_len: n });
            true
        };
        match self {
            DmIoMemory::Kmem(k) => {
                let addr = k.addr() + start as usize;
                if push(iov, addr, len as usize) {
                    covered = len;
                }
            }
            DmIoMemory::Vma(v) => {
                let addr = v.addr() + start as usize;
                if push(iov, addr, len as usize) {
                    covered = len;
                }
            }
            DmIoMemory::Zeroes(_) => {
                let base = zero_area().addr();
                while covered < len {
                    let in_area = ((start + covered) % ZERO_AREA_BYTES as u64) as usize;
                    let n = ((ZERO_AREA_BYTES - in_area) as u64).min(len - covered);
                    if !push(iov, base + in_area, n as usize) {
                        break;
                    }
                    covered += n;
                }
            }
            DmIoMemory::PageList(list) => {
                let mut pos = list.offset as u64 + start;
                while covered < len {
                    let index = (pos / PAGE_SIZE as u64) as usize;
                    let in_page = (pos % PAGE_SIZE as u64) as usize;
                    let Some(page) = list.pages.get(index) else {
                        break;
                    };
                    let n = ((PAGE_SIZE - in_page) as u64).min(len - covered);
                    if !push(iov, page.addr() + in_page, n as usize) {
                        break;
                    }
                    covered += n;
                    pos += n;
                }
            }
            DmIoMemory::Bvec(bvec) => {
                if start < cursor.segment_start {
                    *cursor = MemCursor::default();
                }
                let segs = &bvec.segments;
                // Advance the cursor to the segment holding `start`.
                while cursor.segment < segs.len()
                    && cursor.segment_start + segs[cursor.segment].len as u64 <= start
                {
                    cursor.segment_start += segs[cursor.segment].len as u64;
                    cursor.segment += 1;
                }
                let mut seg = cursor.segment;
                let mut seg_start = cursor.segment_start;
                while covered < len && seg < segs.len() {
                    let s = &segs[seg];
                    let skip = (start + covered - seg_start) as usize;
                    let n = ((s.len() - skip) as u64).min(len - covered);
                    let off = s.offset();
                    if !push(iov, s.page.addr() + off + skip, n as usize) {
                        break;
                    }
                    covered += n;
                    if skip + n as usize == s.len() {
                        seg_start += s.len() as u64;
                        seg += 1;
                    }
                }
            }
        }
        covered
    }

    /// Copies bytes starting at `offset` of the memory into `dst` (as many as fit).
    pub fn copy_to_slice(&self, offset: usize, dst: &mut [u8]) {
        let mut done = 0;
        self.for_each_slice(|pos, bytes| {
            let seg_end = pos + bytes.len();
            let want_start = offset + done;
            if done == dst.len() || seg_end <= want_start {
                return;
            }
            let from = want_start.saturating_sub(pos);
            let n = (bytes.len() - from).min(dst.len() - done);
            dst[done..done + n].copy_from_slice(&bytes[from..from + n]);
            done += n;
        });
    }

    /// Copies `src` into the memory starting at byte `offset` (as much as fits).
    pub fn copy_from_slice(&mut self, offset: usize, src: &[u8]) {
        let mut done = 0;
        self.for_each_slice_mut(|pos, bytes| {
            let seg_end = pos + bytes.len();
            let want_start = offset + done;
            if done == src.len() || seg_end <= want_start {
                return;
            }
            let from = want_start.saturating_sub(pos);
            let n = (bytes.len() - from).min(src.len() - done);
            bytes[from..from + n].copy_from_slice(&src[done..done + n]);
            done += n;
        });
    }

    /// Fills `len` bytes starting at `offset` with zeros (clamped to the memory).
    pub fn zero_range(&mut self, offset: usize, len: usize) {
        let end = offset.saturating_add(len);
        self.for_each_slice_mut(|pos, bytes| {
            let seg_end = pos + bytes.len();
            if seg_end <= offset || pos >= end {
                return;
            }
            let from = offset.saturating_sub(pos);
            let to = (end - pos).min(bytes.len());
            bytes[from..to].fill(0);
        });
    }

    /// All the bytes, in I/O order, as one vector.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len());
        self.for_each_slice(|_, bytes| out.extend_from_slice(bytes));
        out
    }

    /// Calls `f(position, bytes)` for each segment in I/O order.
    pub fn for_each_slice(&self, mut f: impl FnMut(usize, &[u8])) {
        match self {
            DmIoMemory::PageList(list) => {
                let mut pos = 0;
                let mut skip = list.offset;
                for page in &list.pages {
                    if skip >= PAGE_SIZE {
                        skip -= PAGE_SIZE;
                        continue;
                    }
                    f(pos, &page[skip..]);
                    pos += PAGE_SIZE - skip;
                    skip = 0;
                }
            }
            DmIoMemory::Bvec(bvec) => {
                let mut pos = 0;
                for seg in &bvec.segments {
                    f(pos, seg.bytes());
                    pos += seg.len();
                }
            }
            DmIoMemory::Vma(v) => f(0, v),
            DmIoMemory::Kmem(k) => f(0, k),
            DmIoMemory::Zeroes(len) => {
                let area = zero_area();
                let mut pos = 0;
                while pos < *len {
                    let n = (*len - pos).min(ZERO_AREA_BYTES);
                    f(pos, &area[..n]);
                    pos += n;
                }
            }
        }
    }

    /// Calls `f(position, bytes)` for each segment in I/O order, mutably.
    ///
    /// [`DmIoMemory::Zeroes`] is write-only and has no mutable bytes: `f` is not
    /// called for it.
    pub fn for_each_slice_mut(&mut self, mut f: impl FnMut(usize, &mut [u8])) {
        match self {
            DmIoMemory::PageList(list) => {
                let mut pos = 0;
                let mut skip = list.offset;
                for page in &mut list.pages {
                    if skip >= PAGE_SIZE {
                        skip -= PAGE_SIZE;
                        continue;
                    }
                    f(pos, &mut page[skip..]);
                    pos += PAGE_SIZE - skip;
                    skip = 0;
                }
            }
            DmIoMemory::Bvec(bvec) => {
                let mut pos = 0;
                for seg in &mut bvec.segments {
                    let n = seg.len();
                    f(pos, seg.bytes_mut());
                    pos += n;
                }
            }
            DmIoMemory::Vma(v) => f(0, v),
            DmIoMemory::Kmem(k) => f(0, k),
            DmIoMemory::Zeroes(_) => {}
        }
    }
}

impl From<AlignedBuf> for DmIoMemory {
    fn from(buf: AlignedBuf) -> Self {
        DmIoMemory::Kmem(buf)
    }
}

impl From<PageList> for DmIoMemory {
    fn from(list: PageList) -> Self {
        DmIoMemory::PageList(list)
    }
}

impl From<Bvec> for DmIoMemory {
    fn from(bvec: Bvec) -> Self {
        DmIoMemory::Bvec(bvec)
    }
}

impl From<VirtualArea> for DmIoMemory {
    fn from(area: VirtualArea) -> Self {
        DmIoMemory::Vma(area)
    }
}

/// A one-page page list. This allocates the list's `Vec`; to stay allocation-free
/// per request, reuse the `PageList` a completion hands back.
impl From<Page> for DmIoMemory {
    fn from(page: Page) -> Self {
        DmIoMemory::PageList(PageList::new(vec![page]))
    }
}
