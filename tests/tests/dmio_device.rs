//! Opening devices: probed limits on files and loop devices, and a typed error
//! for each way opening can fail (missing path, wrong file type, no O_DIRECT,
//! busy, read-only device, no permission).

use std::os::unix::process::CommandExt;
use std::process::Command;

use dmio::loopdev::{LoopDevice, LoopOptions};
use dmio::{AlignmentSource, BlockDevice, DeviceKind, DeviceOptions, DmIoError};
use tests::{Backing, TestDevice, backings, image_dir};

#[test]
fn limits_are_probed_for_every_backing() {
    for backing in backings() {
        let td = TestDevice::new(backing, 8 << 20);
        let info = *td.dev.info();
        assert_eq!(td.dev.size_bytes(), 8 << 20, "{backing}");
        assert_eq!(td.dev.size_sectors(), (8 << 20) / 512, "{backing}");
        match backing {
            Backing::Loop512 => assert_eq!(info.logical_block_size, 512),
            Backing::Loop4096 => assert_eq!(info.logical_block_size, 4096),
            Backing::File => {
                assert!(info.logical_block_size.is_power_of_two() && info.logical_block_size >= 512)
            }
        }
        assert!(info.dio_mem_align.is_power_of_two(), "{backing}: {info:?}");
        assert!(info.max_io_bytes >= u64::from(info.logical_block_size), "{backing}: {info:?}");
        assert_ne!(
            info.alignment_source,
            AlignmentSource::Conservative,
            "{backing}: alignment was not probed"
        );
        // Files on ext4 and loop devices over them both support hole punching.
        assert!(td.dev.supports_discard(), "{backing}: {info:?}");
        assert!(td.dev.supports_write_zeroes(), "{backing}: {info:?}");
        let is_block = matches!(td.dev.kind(), DeviceKind::BlockDevice { .. });
        assert_eq!(is_block, backing != Backing::File);
    }
}

#[test]
fn missing_path_is_not_found() {
    let err = BlockDevice::open("/nonexistent/dmio-device").unwrap_err();
    assert!(matches!(err, DmIoError::NotFound { .. }), "{err:?}");
    assert!(err.to_string().contains("/nonexistent/dmio-device"));
}

#[test]
fn directories_and_character_devices_are_refused_by_type() {
    let err = BlockDevice::open(image_dir()).unwrap_err();
    assert!(matches!(err, DmIoError::NotABlockDevice { kind: "directory", .. }), "{err:?}");
    let err = BlockDevice::open("/dev/null").unwrap_err();
    assert!(matches!(err, DmIoError::NotABlockDevice { kind: "character device", .. }), "{err:?}");
    assert!(err.to_string().contains("neither a block device nor a regular file"));
}

#[test]
fn a_filesystem_without_o_direct_is_reported() {
    // procfs files are regular files that cannot be opened with O_DIRECT.
    let err = BlockDevice::open_with("/proc/self/status", DeviceOptions::new().read_only(true))
        .unwrap_err();
    assert!(matches!(err, DmIoError::DirectIoUnsupported { .. }), "{err:?}");
    assert!(err.to_string().contains("O_DIRECT"));
}

#[test]
fn exclusive_opens_exclude_each_other() {
    for backing in backings() {
        let td = TestDevice::new(backing, 1 << 20);
        let path = td.dev.path().to_path_buf();
        let first = BlockDevice::open_with(&path, DeviceOptions::new().exclusive(true)).unwrap();
        assert!(first.is_exclusive());
        let err = BlockDevice::open_with(&path, DeviceOptions::new().exclusive(true)).unwrap_err();
        assert!(matches!(err, DmIoError::Busy { .. }), "{backing}: {err:?}");
        drop(first);
        BlockDevice::open_with(&path, DeviceOptions::new().exclusive(true)).unwrap();
    }
}

#[test]
fn a_read_only_block_device_cannot_be_opened_for_writing() {
    if dmio::loopdev::unavailable_reason().is_some() {
        assert!(!tests::loop_required(), "loop devices are required");
        eprintln!("skipping: no loop devices");
        return;
    }
    let dir = tempfile::tempdir_in(image_dir()).unwrap();
    let image = dir.path().join("ro.img");
    std::fs::File::create(&image).unwrap().set_len(1 << 20).unwrap();
    let lo = LoopDevice::attach(&image, LoopOptions::new().read_only(true)).unwrap();
    let err = BlockDevice::open(lo.path()).unwrap_err();
    assert!(matches!(err, DmIoError::DeviceReadOnly { .. }), "{err:?}");
    let dev = BlockDevice::open_with(lo.path(), DeviceOptions::new().read_only(true)).unwrap();
    assert!(dev.is_read_only());
}

#[test]
fn size_can_be_refreshed_after_a_file_grows() {
    let td = TestDevice::new(Backing::File, 1 << 20);
    std::fs::OpenOptions::new().write(true).open(td.image()).unwrap().set_len(2 << 20).unwrap();
    assert_eq!(td.dev.size_bytes(), 1 << 20);
    assert_eq!(td.dev.refresh_size().unwrap(), 2 << 20);
    assert_eq!(td.dev.size_sectors(), 4096);
}

/// Runs in a child process as user `nobody` (see below).
#[test]
fn child_opens_without_permission() {
    let Some(path) = std::env::var_os("DMIO_CHILD_OPEN") else {
        return;
    };
    let err = BlockDevice::open(&path).unwrap_err();
    assert!(matches!(err, DmIoError::PermissionDenied { read_only: false, .. }), "{err:?}");
    let err = BlockDevice::open_with(&path, DeviceOptions::new().read_only(true)).unwrap_err();
    assert!(matches!(err, DmIoError::PermissionDenied { read_only: true, .. }), "{err:?}");
}

#[test]
fn no_permission_is_permission_denied() {
    // The child drops to `nobody`, which only root can do.
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipping: needs root to run a child as another user");
        return;
    }
    let dir = tempfile::tempdir_in(image_dir()).unwrap();
    let image = dir.path().join("private.img");
    std::fs::File::create(&image).unwrap().set_len(1 << 20).unwrap();
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .unwrap();
    std::fs::set_permissions(&image, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    // The test binary may sit in a directory `nobody` cannot enter (a private
    // checkout): run a copy from the world-readable image directory instead.
    let exe = dir.path().join("dmio-device-test");
    std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    std::fs::set_permissions(&exe, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let status = Command::new(&exe)
        .args(["--exact", "child_opens_without_permission", "--test-threads=1"])
        .env("DMIO_CHILD_OPEN", &image)
        .uid(65534)
        .gid(65534)
        .status()
        .unwrap();
    assert!(status.success(), "the unprivileged child did not get PermissionDenied");
}
