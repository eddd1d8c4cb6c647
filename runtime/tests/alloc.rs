//! `retain_freed_memory`, in its own test binary without the test harness: it changes the
//! process's allocator settings, which must happen before any other thread allocates (as the
//! CLI does first thing in `main`).

/// Minor page faults of the calling thread so far (`/proc/thread-self/stat`, field 10).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn thread_minor_faults() -> u64 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").expect("reading /proc/thread-self/stat");
    // Fields after the parenthesized command name, which may itself hold spaces.
    let rest = &stat[stat.rfind(')').expect("a command name") + 2..];
    rest.split(' ').nth(7).expect("field 10").parse().expect("a count")
}

/// Once applied, a freed 64 MiB block is reused without faulting its pages in again (with
/// glibc's defaults it is unmapped on free and the next one faults all 16384 pages). On the
/// main thread, where the executor allocates its ops' results: other threads' arenas map any
/// block over 64 MiB on their own whatever the settings.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn main() {
    assert!(
        vitdet_runtime::alloc::retain_freed_memory(),
        "glibc refused the settings"
    );
    let reallocation_faults = || {
        const BYTES: usize = 64 << 20;
        let touch = || {
            let v = std::hint::black_box(vec![1u8; BYTES]);
            assert_eq!(v[BYTES - 1], 1);
        };
        touch();
        let before = thread_minor_faults();
        touch();
        thread_minor_faults() - before
    };
    let faults = reallocation_faults();
    assert!(faults < 1024, "{faults} page faults re-allocating a freed 64 MiB block");
    println!("freed large blocks are reused: {faults} page faults on reallocation");
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn main() {
    println!("skipped: retain_freed_memory tunes glibc only");
}
