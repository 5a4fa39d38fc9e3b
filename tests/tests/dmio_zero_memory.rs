//! `DmIoMemory::Zeroes`: shared zero memory for writes, rejected for reads; and
//! the helpers layers above dm-io rely on (`is_same_device`, `in_notify_callback`).

use dmio::{DmIoError, DmIoMemory, DmIoRegion, DmIoRequest};
use tests::{TestDevice, check_pattern, pattern, scenarios, sectors_of, write_pattern};

#[test]
fn zero_memory_writes_zeros_on_every_backing_and_engine() {
    for (at, td, client) in scenarios(8 << 20) {
        write_pattern(&client, &td.dev, 0, 8192, 3);
        // 3 MiB crosses the 1 MiB shared area twice; the fan-out writes it twice.
        let regions = [DmIoRegion::new(&td.dev, 512, 6144), DmIoRegion::new(&td.dev, 7168, 512)];
        let done = client.io_sync(DmIoRequest::write(DmIoMemory::Zeroes(3 << 20)), &regions);
        assert!(done.unwrap().is_ok(), "{at}");
        let image = td.read_back();
        check_pattern(sectors_of(&image, 0, 512), 0, 3).unwrap_or_else(|e| panic!("{at}: {e}"));
        assert!(sectors_of(&image, 512, 6144).iter().all(|&b| b == 0), "{at}: not zeroed");
        check_pattern(sectors_of(&image, 6656, 512), 6656, 3)
            .unwrap_or_else(|e| panic!("{at}: {e}"));
        assert!(sectors_of(&image, 7168, 512).iter().all(|&b| b == 0), "{at}: not zeroed");
        // Nothing wrote into the shared area: it still reads as zeros.
        assert!(DmIoMemory::Zeroes(2 << 20).to_vec().iter().all(|&b| b == 0));
    }
}

#[test]
fn a_read_into_zero_memory_is_rejected_before_any_io() {
    for (at, td, client) in scenarios(1 << 20) {
        td.dev.faults().start_trace();
        let err = client
            .io_sync(DmIoRequest::read(DmIoMemory::Zeroes(4096)), &[DmIoRegion::new(&td.dev, 0, 8)])
            .unwrap_err();
        assert!(matches!(err, DmIoError::ReadIntoZeroes), "{at}: {err:?}");
        assert!(td.dev.faults().take_trace().is_empty(), "{at}: I/O was issued");
        let mut mem = DmIoMemory::Zeroes(4096);
        mem.copy_from_slice(0, &pattern(0, 8, 1));
        assert!(mem.to_vec().iter().all(|&b| b == 0), "{at}: zero memory was written");
    }
}

#[test]
fn the_same_file_opened_twice_is_the_same_device() {
    let a = TestDevice::new(tests::Backing::File, 1 << 20);
    let b = TestDevice::new(tests::Backing::File, 1 << 20);
    let a2 = dmio::BlockDevice::open(a.image()).unwrap();
    assert!(a.dev.is_same_device(&a2));
    assert!(a.dev.is_same_device(&a.dev));
    assert!(!a.dev.is_same_device(&b.dev));
}

#[test]
fn in_notify_callback_is_true_only_on_the_completion_thread() {
    let td = TestDevice::new(tests::Backing::File, 1 << 20);
    let client = dmio::DmIoClient::new().unwrap();
    assert!(!dmio::in_notify_callback());
    let (tx, rx) = std::sync::mpsc::channel();
    let req = DmIoRequest::write(DmIoMemory::Zeroes(4096))
        .on_complete(move |_| tx.send(dmio::in_notify_callback()).unwrap());
    client.submit(req, &[DmIoRegion::new(&td.dev, 0, 8)]).unwrap();
    assert!(rx.recv().unwrap(), "in_notify_callback() was false inside a callback");
}

#[test]
fn a_loop_device_is_the_same_device_as_its_backing_file() {
    for backing in tests::backings().into_iter().filter(|b| *b != tests::Backing::File) {
        let td = TestDevice::new(backing, 1 << 20);
        let other = TestDevice::new(tests::Backing::File, 1 << 20);
        let file = dmio::BlockDevice::open(td.image()).unwrap();
        assert!(td.dev.is_same_device(&file), "{backing}: loop device vs its backing file");
        assert!(file.is_same_device(&td.dev), "{backing}: backing file vs its loop device");
        assert!(!td.dev.is_same_device(&other.dev), "{backing}: loop device vs another file");
    }
}
