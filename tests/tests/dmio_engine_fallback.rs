//! Engine selection: the automatic fallback to the sync engine when io_uring
//! cannot be set up (here: blocked by a seccomp filter, the way containers block
//! it), the one-line reason, an explicit io_uring request failing cleanly, and the
//! `DMIO_ENGINE` override.

use std::collections::BTreeMap;
use std::process::Command;

use dmio::{DmIoClient, DmIoConfig, DmIoError, EngineChoice, EngineKind};
use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};
use tests::{Backing, TestDevice, check_pattern, read_region, write_pattern};

/// Runs `f` on a new thread whose io_uring_setup calls fail with `errno` (the
/// filter is inherited by the threads it spawns, such as the client's
/// completion thread).
fn with_io_uring_blocked<T: Send + 'static>(
    errno: i32,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    std::thread::spawn(move || {
        let arch =
            TargetArch::try_from(std::env::consts::ARCH).expect("a seccomp target architecture");
        let rules = BTreeMap::from([(libc::SYS_io_uring_setup, vec![])]);
        let filter = SeccompFilter::new(
            rules,
            SeccompAction::Allow,
            SeccompAction::Errno(errno as u32),
            arch,
        )
        .expect("building the seccomp filter");
        let program: BpfProgram = filter.try_into().expect("compiling the seccomp filter");
        seccompiler::apply_filter(&program).expect("installing the seccomp filter");
        f()
    })
    .join()
    .expect("the filtered thread panicked")
}

#[test]
fn seccomp_blocked_io_uring_falls_back_to_the_sync_engine_and_says_why() {
    let (engine, reason, data_ok) = with_io_uring_blocked(libc::EPERM, || {
        let client = DmIoClient::new().expect("Auto must fall back, not fail");
        let td = TestDevice::new(Backing::File, 1 << 20);
        write_pattern(&client, &td.dev, 8, 16, 3);
        let bytes = read_region(&client, &td.dev, 8, 16);
        (
            client.engine(),
            client.engine_fallback_reason().map(str::to_owned),
            check_pattern(&bytes, 8, 3),
        )
    });
    assert_eq!(engine, EngineKind::Sync);
    let reason = reason.expect("a fallback reason");
    assert!(reason.contains("seccomp"), "reason should name seccomp: {reason}");
    data_ok.unwrap();
}

#[test]
fn missing_io_uring_is_reported_as_too_old_or_absent() {
    let reason = with_io_uring_blocked(libc::ENOSYS, || {
        let client = DmIoClient::new().unwrap();
        assert_eq!(client.engine(), EngineKind::Sync);
        client.engine_fallback_reason().map(str::to_owned)
    });
    let reason = reason.expect("a fallback reason");
    assert!(reason.contains("ENOSYS") && reason.contains("too old"), "{reason}");
}

#[test]
fn an_explicit_io_uring_request_fails_with_the_reason_instead_of_falling_back() {
    let result = with_io_uring_blocked(libc::EPERM, || {
        DmIoClient::with_config(DmIoConfig { engine: EngineChoice::Uring, ..Default::default() })
            .map(|_| ())
    });
    match result {
        Err(DmIoError::EngineSetup { engine: "io_uring", reason }) => {
            assert!(reason.contains("seccomp"), "{reason}")
        }
        other => panic!("expected EngineSetup, got {other:?}"),
    }
}

#[test]
fn io_uring_is_the_default_where_it_works() {
    if std::env::var_os("DMIO_ENGINE").is_some() {
        eprintln!("skipping: DMIO_ENGINE is set, so Auto does not choose by itself");
        return;
    }
    let client = DmIoClient::new().unwrap();
    assert_eq!(client.engine(), EngineKind::Uring);
    assert!(client.engine_fallback_reason().is_none());
}

/// Runs in a child process (see below) with DMIO_ENGINE set.
#[test]
fn child_reports_engine_from_environment() {
    let Ok(expected) = std::env::var("DMIO_CHILD_EXPECT") else {
        return;
    };
    let client = DmIoClient::new().unwrap();
    assert_eq!(format!("{}", client.engine()), expected);
}

#[test]
fn dmio_engine_environment_variable_overrides_auto() {
    for (value, expected) in [("sync", "sync"), ("uring", "io_uring")] {
        let status = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child_reports_engine_from_environment", "--test-threads=1"])
            .env("DMIO_ENGINE", value)
            .env("DMIO_CHILD_EXPECT", expected)
            .status()
            .unwrap();
        assert!(status.success(), "DMIO_ENGINE={value} did not select {expected}");
    }
}
