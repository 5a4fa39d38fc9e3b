//! Write, read back and verify on every backing with both engines, with every
//! memory type.

use dmio::{AlignedBuf, BioVec, Bvec, DmIoMemory, DmIoRegion, DmIoRequest, PageList, VirtualArea};
use tests::{Backing, TestDevice, check_pattern, client, pattern, scenarios, sectors_of};

fn memories(bytes: &[u8], pool: &dmio::PagePool) -> Vec<DmIoMemory> {
    let len = bytes.len();
    let mut kmem = AlignedBuf::new(len);
    kmem.copy_from_slice(bytes);
    let mut vma = VirtualArea::new(len).unwrap();
    vma.copy_from_slice(bytes);
    let pages = len.div_ceil(4096);
    let mut list = DmIoMemory::PageList(pool.alloc_list(pages));
    list.copy_from_slice(0, bytes);
    // A bio vector of whole pages, in reverse address order.
    let segs: Vec<BioVec> = (0..pages).map(|_| BioVec::whole(pool.alloc())).collect();
    let mut bvec = DmIoMemory::Bvec(Bvec::new(segs));
    bvec.copy_from_slice(0, bytes);
    vec![DmIoMemory::Kmem(kmem), DmIoMemory::Vma(vma), list, bvec]
}

#[test]
fn write_read_verify_every_backing_engine_and_memory() {
    for (at, td, client) in scenarios(8 << 20) {
        let sectors = 256u64; // 128 KiB
        for (i, mem) in
            memories(&pattern(0, sectors, 7), client.page_pool()).into_iter().enumerate()
        {
            let start = 1024 + i as u64 * 512;
            let region = DmIoRegion::new(&td.dev, start, sectors);
            let mut mem = mem;
            mem.copy_from_slice(0, &pattern(start, sectors, 7));
            let kind = mem.kind_name();
            let done =
                client.io_sync(DmIoRequest::write(mem), std::slice::from_ref(&region)).unwrap();
            assert!(done.is_ok(), "{at}/{kind}: write failed: {:?}", done.failures);
            let back = DmIoMemory::PageList(PageList::new(client.page_pool().alloc_list(32).pages));
            let done = client.io_sync(DmIoRequest::read(back), &[region]).unwrap();
            let bytes = done.into_result().unwrap().unwrap().to_vec();
            check_pattern(&bytes, start, 7).unwrap_or_else(|e| panic!("{at}/{kind}: {e}"));
        }
        let image = td.read_back();
        check_pattern(sectors_of(&image, 1024, 256), 1024, 7).unwrap();
    }
}

/// The client's page pool is registered with the ring: a transfer from one pool
/// page uses the fixed-buffer opcodes (where the kernel allows registration),
/// and a heap buffer does not.
#[test]
fn pool_pages_use_fixed_buffers_with_io_uring() {
    let td = TestDevice::new(Backing::File, 1 << 20);
    let client = client(dmio::EngineChoice::Uring);
    let before = client.stats();
    let page = client.page_pool().alloc();
    let done = client.io_sync(DmIoRequest::read(page), &[DmIoRegion::new(&td.dev, 0, 8)]).unwrap();
    assert!(done.is_ok());
    assert_eq!(
        client.stats().since(&before).fixed_buffer_ops,
        1,
        "the pool page was not used as a fixed buffer"
    );
    let before = client.stats();
    let done = client
        .io_sync(DmIoRequest::read(AlignedBuf::new(4096)), &[DmIoRegion::new(&td.dev, 0, 8)])
        .unwrap();
    assert!(done.is_ok());
    assert_eq!(client.stats().since(&before).fixed_buffer_ops, 0);
}

/// A one-page buffer lent from the client's pool (`PagePool::buffer`) is
/// contiguous memory (`Kmem`) inside the registered arena: submitted through
/// the ring it uses the fixed-buffer opcodes and its data round-trips; a heap
/// buffer of the same size does not use them. Dropping the buffer gives the
/// page back.
#[test]
fn pool_buffers_use_fixed_buffers_with_io_uring() {
    let td = TestDevice::new(Backing::File, 1 << 20);
    let client = client(dmio::EngineChoice::Uring);
    let region = [DmIoRegion::new(&td.dev, 16, 8)];
    let free = client.page_pool().free_reserve_pages();
    let mut buf = client.page_pool().buffer(4096);
    assert!(buf.is_pool_page());
    assert_eq!(client.page_pool().free_reserve_pages(), free - 1);
    buf.copy_from_slice(&pattern(16, 8, 3));
    let before = client.stats();
    let done = pollster::block_on(client.submit_future(DmIoRequest::write(buf), &region).unwrap());
    let buf = match done.into_result().unwrap() {
        Some(DmIoMemory::Kmem(buf)) => buf,
        other => panic!("the buffer did not come back: {other:?}"),
    };
    assert_eq!(client.stats().since(&before).fixed_buffer_ops, 1, "no fixed-buffer write");
    check_pattern(sectors_of(&td.read_back(), 16, 8), 16, 3).unwrap();
    drop(buf);
    assert_eq!(client.page_pool().free_reserve_pages(), free, "the page did not come back");

    let back = client.page_pool().buffer(4096);
    assert!(back.iter().all(|&b| b == 0), "a lent page is zero-filled");
    let before = client.stats();
    let done = pollster::block_on(client.submit_future(DmIoRequest::read(back), &region).unwrap());
    let Some(DmIoMemory::Kmem(back)) = done.into_result().unwrap() else { panic!() };
    assert_eq!(client.stats().since(&before).fixed_buffer_ops, 1, "no fixed-buffer read");
    check_pattern(&back, 16, 3).unwrap();

    let before = client.stats();
    let heap = AlignedBuf::new(4096);
    let done = pollster::block_on(client.submit_future(DmIoRequest::read(heap), &region).unwrap());
    assert!(done.is_ok());
    assert_eq!(client.stats().since(&before).fixed_buffer_ops, 0, "a heap buffer is not fixed");
}
