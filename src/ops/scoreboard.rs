//! The scoreboard: counters and current requests in shared memory, so that a
//! status request, which reaches one process, can show them all.
//!
//! One [`Board`] is a header and a fixed number of [`Slot`]s, one per process
//! (an Apache child, an nginx worker, a daemon process), all plain atomics: a
//! process writes only its own slot with relaxed atomics (no lock, no
//! allocation, no system call per request), and readers copy what they see.
//! The embedded board is an anonymous `MAP_SHARED` mapping made by the
//! server's parent before it forks; a daemon group's is a file in the run
//! directory, made by the supervisor per generation and mapped by its daemon
//! processes through an inherited descriptor, read by the server's workers.
//!
//! A request's method and URI sit in a [`Current`] record guarded by a
//! sequence counter (a seqlock): odd while its one writer changes it, so a
//! reader retries or skips a record that changed under it.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicPtr, AtomicU32, AtomicU64, Ordering::*};

const MAGIC: u64 = u64::from_be_bytes(*b"GWSTATUS");
/// The layout's version: a reader refuses a board of another.
const VERSION: u32 = 1;

/// Upper bounds (microseconds) of the latency histogram's buckets; one more
/// bucket holds what is slower (`+Inf`).
pub const BUCKET_BOUNDS_US: [u64; 11] = [
    5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000, 5_000_000,
    10_000_000,
];
pub const BUCKETS: usize = BUCKET_BOUNDS_US.len() + 1;
/// Current requests a slot shows at once; more still count, unseen.
pub const RECORDS: usize = 64;
/// Bytes of a request's URI that a record keeps (the rest is cut).
pub const URI_MAX: usize = 200;
const METHOD_MAX: usize = 16;
/// Daemon groups whose server-side counters the embedded board keeps.
pub const MAX_GROUPS: usize = 32;
const GROUP_NAME_MAX: usize = 64;

/// Why a daemon process was replaced, as counted per group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Reason {
    Crash = 0,
    MaxRequests = 1,
    Memory = 2,
    Reload = 3,
    Change = 4,
    IdleShrink = 5,
    Timeout = 6,
}

impl Reason {
    pub const ALL: [Reason; 7] = [
        Reason::Crash,
        Reason::MaxRequests,
        Reason::Memory,
        Reason::Reload,
        Reason::Change,
        Reason::IdleShrink,
        Reason::Timeout,
    ];

    /// The label of the reason in the status page.
    pub fn name(self) -> &'static str {
        match self {
            Reason::Crash => "crash",
            Reason::MaxRequests => "max-requests",
            Reason::Memory => "memory",
            Reason::Reload => "reload",
            Reason::Change => "change",
            Reason::IdleShrink => "idle-shrink",
            Reason::Timeout => "request-timeout",
        }
    }

    fn from_code(code: u32) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| *r as u32 == code)
    }
}

/// A process's state in its slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum State {
    Starting = 1,
    Ready = 2,
    Draining = 3,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Ready => "ready",
            State::Draining => "draining",
        }
    }

    fn from_code(code: u32) -> Option<State> {
        [State::Starting, State::Ready, State::Draining]
            .into_iter()
            .find(|s| *s as u32 == code)
    }
}

/// Requests by status class, and their latency.
#[repr(C)]
pub struct Counters {
    requests: AtomicU64,
    /// 1xx to 5xx.
    classes: [AtomicU64; 5],
    buckets: [AtomicU64; BUCKETS],
    sum_us: AtomicU64,
}

/// A copy of [`Counters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub requests: u64,
    pub classes: [u64; 5],
    /// Per bucket, not cumulative.
    pub buckets: [u64; BUCKETS],
    pub sum_us: u64,
}

impl Totals {
    pub fn add(&mut self, other: &Totals) {
        self.requests += other.requests;
        self.sum_us += other.sum_us;
        for (a, b) in self.classes.iter_mut().zip(other.classes) {
            *a += b;
        }
        for (a, b) in self.buckets.iter_mut().zip(other.buckets) {
            *a += b;
        }
    }
}

/// The bucket of a request that took `us` microseconds.
fn bucket_of(us: u64) -> usize {
    BUCKET_BOUNDS_US
        .iter()
        .position(|&bound| us <= bound)
        .unwrap_or(BUCKET_BOUNDS_US.len())
}

/// The class index (0 for 1xx) of `status`; anything outside 100..=599 is a
/// 5xx (the request failed in a way the server answers with an error).
fn class_of(status: u16) -> usize {
    match status {
        100..=599 => usize::from(status / 100 - 1),
        _ => 4,
    }
}

impl Counters {
    pub fn record(&self, status: u16, us: u64) {
        self.requests.fetch_add(1, Relaxed);
        self.classes[class_of(status)].fetch_add(1, Relaxed);
        self.buckets[bucket_of(us)].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
    }

    pub fn load(&self) -> Totals {
        Totals {
            requests: self.requests.load(Relaxed),
            classes: self.classes.each_ref().map(|c| c.load(Relaxed)),
            buckets: self.buckets.each_ref().map(|b| b.load(Relaxed)),
            sum_us: self.sum_us.load(Relaxed),
        }
    }

    /// Adds `t` (a retired process's counters).
    fn add(&self, t: &Totals) {
        self.requests.fetch_add(t.requests, Relaxed);
        self.sum_us.fetch_add(t.sum_us, Relaxed);
        for (c, n) in self.classes.iter().zip(t.classes) {
            c.fetch_add(n, Relaxed);
        }
        for (b, n) in self.buckets.iter().zip(t.buckets) {
            b.fetch_add(n, Relaxed);
        }
    }

    /// Takes the counters, leaving zeros: an increment made meanwhile is either
    /// taken or left for the next take, never lost.
    fn take(&self) -> Totals {
        Totals {
            requests: self.requests.swap(0, Relaxed),
            classes: self.classes.each_ref().map(|c| c.swap(0, Relaxed)),
            buckets: self.buckets.each_ref().map(|b| b.swap(0, Relaxed)),
            sum_us: self.sum_us.swap(0, Relaxed),
        }
    }

    /// Moves these counters into `into`: what a process that ended served stays counted.
    fn fold_into(&self, into: &Counters) {
        into.add(&self.take());
    }
}

/// One request in progress: its method, URI and start.
#[repr(C)]
pub struct Current {
    /// 1 while a request holds the record.
    busy: AtomicU32,
    method_len: AtomicU32,
    /// Odd while the writer changes the record.
    seq: AtomicU64,
    started_us: AtomicU64,
    uri_len: AtomicU64,
    method: [AtomicU64; METHOD_MAX / 8],
    uri: [AtomicU64; URI_MAX / 8],
}

/// Copies `src` into `words` (little-endian bytes, the rest zero); how many bytes fit.
fn store_bytes(words: &[AtomicU64], src: &[u8]) -> usize {
    let n = src.len().min(words.len() * 8);
    for (i, word) in words.iter().enumerate() {
        let mut bytes = [0u8; 8];
        let from = (i * 8).min(n);
        let to = (i * 8 + 8).min(n);
        bytes[..to - from].copy_from_slice(&src[from..to]);
        word.store(u64::from_le_bytes(bytes), Relaxed);
        if to == n {
            break;
        }
    }
    n
}

fn load_bytes(words: &[AtomicU64], len: usize) -> Vec<u8> {
    let mut out: Vec<u8> = words
        .iter()
        .flat_map(|w| w.load(Relaxed).to_le_bytes())
        .collect();
    out.truncate(len.min(words.len() * 8));
    out
}

/// What a reader saw of a [`Current`] record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub uri: String,
    pub started_us: u64,
}

impl Current {
    /// Writes the record of a request (its holder is the only writer).
    fn write(&self, method: &[u8], uri: &[u8], started_us: u64) {
        let seq = self.seq.load(Relaxed);
        self.seq.store(seq | 1, Relaxed);
        fence(Release);
        self.started_us.store(started_us, Relaxed);
        let n = store_bytes(&self.method, method);
        self.method_len.store(n as u32, Relaxed);
        let n = store_bytes(&self.uri, uri);
        self.uri_len.store(n as u64, Relaxed);
        self.seq.store((seq | 1) + 1, Release);
    }

    /// A consistent copy of the record, if a request holds it.
    fn read(&self) -> Option<Request> {
        for _ in 0..4 {
            let before = self.seq.load(Acquire);
            if self.busy.load(Relaxed) == 0 {
                return None;
            }
            if before & 1 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let started_us = self.started_us.load(Relaxed);
            let method = load_bytes(&self.method, self.method_len.load(Relaxed) as usize);
            let uri = load_bytes(&self.uri, self.uri_len.load(Relaxed) as usize);
            fence(Acquire);
            if self.seq.load(Relaxed) == before {
                return Some(Request {
                    method: String::from_utf8_lossy(&method).into_owned(),
                    uri: String::from_utf8_lossy(&uri).into_owned(),
                    started_us,
                });
            }
        }
        None
    }
}

/// One process's slot.
#[repr(C)]
pub struct Slot {
    /// 0: free.
    pid: AtomicU32,
    state: AtomicU32,
    /// Why the process drains (a [`Reason`] code + 1; 0: none told).
    reason: AtomicU32,
    /// Threads that can run requests.
    threads: AtomicU32,
    busy: AtomicU32,
    _pad: AtomicU32,
    /// Unix time the process started, in seconds.
    started: AtomicU64,
    rss_bytes: AtomicU64,
    counters: Counters,
    records: [Current; RECORDS],
}

/// Server-side counters of one daemon group, kept in the embedded board: what
/// a server process decides itself about the group's requests.
#[repr(C)]
pub struct GroupCounters {
    name_len: AtomicU64,
    name: [AtomicU64; GROUP_NAME_MAX / 8],
    /// Requests answered 503 (shed: overloaded, queue-timeout, not running).
    shed: AtomicU64,
    /// Requests answered 504 (request-timeout, socket-timeout).
    timeouts: AtomicU64,
    /// Requests waiting now for a daemon process to take their connection.
    queued: AtomicU64,
    queued_max: AtomicU64,
}

impl GroupCounters {
    /// Whether this is the group `name`, compared word by word (no copy).
    fn is(&self, name: &[u8]) -> bool {
        if self.name_len.load(Relaxed) != name.len() as u64 {
            return false;
        }
        name.chunks(8).zip(&self.name).all(|(chunk, word)| {
            let mut bytes = [0u8; 8];
            bytes[..chunk.len()].copy_from_slice(chunk);
            word.load(Relaxed) == u64::from_le_bytes(bytes)
        })
    }

    pub fn count_shed(&self) {
        self.shed.fetch_add(1, Relaxed);
    }

    pub fn count_timeout(&self) {
        self.timeouts.fetch_add(1, Relaxed);
    }

    /// Counts a request waiting in the queue until the guard drops.
    pub fn enter_queue(&self) -> Queued<'_> {
        let now = self.queued.fetch_add(1, Relaxed) + 1;
        self.queued_max.fetch_max(now, Relaxed);
        Queued(self)
    }

    pub fn load(&self) -> GroupTotals {
        GroupTotals {
            shed: self.shed.load(Relaxed),
            timeouts: self.timeouts.load(Relaxed),
            queued: self.queued.load(Relaxed),
            queued_max: self.queued_max.load(Relaxed),
        }
    }
}

/// A request counted in its group's queue (see [`GroupCounters::enter_queue`]).
pub struct Queued<'a>(&'a GroupCounters);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.queued.fetch_sub(1, Relaxed);
    }
}

/// A copy of [`GroupCounters`]' numbers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GroupTotals {
    pub shed: u64,
    pub timeouts: u64,
    pub queued: u64,
    pub queued_max: u64,
}

impl GroupTotals {
    pub fn add(&mut self, o: &GroupTotals) {
        self.shed += o.shed;
        self.timeouts += o.timeouts;
        self.queued += o.queued;
        self.queued_max = self.queued_max.max(o.queued_max);
    }
}

#[repr(C)]
struct Header {
    magic: AtomicU64,
    version: AtomicU32,
    slots: AtomicU32,
    /// Set by the maker (a generation's start time, in microseconds since the epoch).
    generation: AtomicU64,
    /// Whether requests are counted (`GatewayStatusCounters`).
    counting: AtomicU32,
    _pad: AtomicU32,
    /// What processes that ended had counted.
    retired: Counters,
    restarts: [AtomicU64; Reason::ALL.len()],
    groups: [GroupCounters; MAX_GROUPS],
}

const _: () = assert!(std::mem::size_of::<Header>() % 8 == 0);
const _: () = assert!(std::mem::size_of::<Slot>() % 8 == 0);

/// Bytes of a board with `slots` slots.
fn size_for(slots: usize) -> usize {
    std::mem::size_of::<Header>() + slots * std::mem::size_of::<Slot>()
}

/// Microseconds on the system-wide monotonic clock (vDSO: no system call),
/// comparable between processes.
pub fn monotonic_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes the time into a local.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Whether process `pid` is gone.
fn is_dead(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    let rc = unsafe { libc::kill(pid as libc::pid_t, 0) };
    rc != 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

/// A mapped scoreboard.
pub struct Board {
    base: NonNull<u8>,
    len: usize,
    /// How many slots the mapping holds, from its length: never re-read from the
    /// header, which a daemon process (running application code) can write.
    slots: usize,
}

// SAFETY: the mapping holds atomics only; it is shared as they are.
unsafe impl Send for Board {}
// SAFETY: as above.
unsafe impl Sync for Board {}

impl Drop for Board {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping this board made and nothing else refers to
        // (references into it borrow the board).
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// Maps `len` bytes of `fd` (or anonymous memory for -1), shared.
fn map(fd: RawFd, len: usize, writable: bool) -> io::Result<NonNull<u8>> {
    let prot = if writable {
        libc::PROT_READ | libc::PROT_WRITE
    } else {
        libc::PROT_READ
    };
    let flags = if fd < 0 {
        libc::MAP_SHARED | libc::MAP_ANONYMOUS
    } else {
        libc::MAP_SHARED
    };
    // SAFETY: a new mapping at an address the kernel picks; nothing is overwritten.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, fd, 0) };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    NonNull::new(p.cast()).ok_or_else(|| io::Error::other("mmap gave NULL"))
}

fn file_len(fd: RawFd) -> io::Result<usize> {
    // SAFETY: stat is plain data; all zeroes is a valid value that fstat overwrites.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: stats a descriptor the caller holds into st.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.st_size.max(0) as usize)
}

impl Board {
    /// A new board in anonymous shared memory, for the server processes that
    /// fork after; `groups` names the daemon groups whose server-side counters it keeps.
    pub fn anonymous(slots: usize, counting: bool, groups: &[&str]) -> io::Result<Board> {
        let len = size_for(slots);
        let board = Board {
            base: map(-1, len, true)?,
            len,
            slots,
        };
        board.init(slots, counting, groups);
        Ok(board)
    }

    /// A new board in the file `fd` (emptied and sized here).
    pub fn create_in(fd: RawFd, slots: usize, counting: bool) -> io::Result<Board> {
        let len = size_for(slots);
        // SAFETY: sizes the file the caller holds open for writing.
        if unsafe { libc::ftruncate(fd, 0) } != 0 || unsafe { libc::ftruncate(fd, len as i64) } != 0
        {
            return Err(io::Error::last_os_error());
        }
        let board = Board {
            base: map(fd, len, true)?,
            len,
            slots,
        };
        board.init(slots, counting, &[]);
        Ok(board)
    }

    /// The board in file `fd`, made by [`Board::create_in`], to write into.
    pub fn map_fd(fd: RawFd) -> io::Result<Board> {
        Board::checked(fd, true)
    }

    /// The board in file `path`, to read.
    pub fn open(path: &Path) -> io::Result<Board> {
        let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
        // SAFETY: opens a NUL-terminated path; the descriptor is owned below.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just opened and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Board::checked(fd.as_raw_fd(), false)
    }

    fn checked(fd: RawFd, writable: bool) -> io::Result<Board> {
        let len = file_len(fd)?;
        if len < size_for(0) {
            return Err(io::Error::other("the status file is too short"));
        }
        let slots = (len - size_for(0)) / std::mem::size_of::<Slot>();
        let board = Board {
            base: map(fd, len, writable)?,
            len,
            slots,
        };
        let h = board.header();
        if h.magic.load(Acquire) != MAGIC
            || h.version.load(Relaxed) != VERSION
            || h.slots.load(Relaxed) as usize != slots
            || size_for(slots) != len
        {
            return Err(io::Error::other(
                "the status file is not a scoreboard of this version",
            ));
        }
        Ok(board)
    }

    fn init(&self, slots: usize, counting: bool, groups: &[&str]) {
        let h = self.header();
        h.version.store(VERSION, Relaxed);
        h.slots.store(slots as u32, Relaxed);
        h.generation.store(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_micros() as u64),
            Relaxed,
        );
        h.counting.store(u32::from(counting), Relaxed);
        for (g, name) in h.groups.iter().zip(groups) {
            let n = store_bytes(&g.name, name.as_bytes());
            g.name_len.store(n as u64, Relaxed);
        }
        h.magic.store(MAGIC, Release);
    }

    fn header(&self) -> &Header {
        // SAFETY: the mapping starts with a Header (made so, or checked) and is
        // page-aligned; all-zero bytes are valid atomics.
        unsafe { &*self.base.as_ptr().cast::<Header>() }
    }

    pub fn slots(&self) -> &[Slot] {
        // SAFETY: the mapping is size_for(self.slots) bytes (made so, or its
        // length checked), so self.slots slots follow the header, aligned as the
        // header's size is a multiple of 8.
        unsafe {
            std::slice::from_raw_parts(
                self.base.as_ptr().add(std::mem::size_of::<Header>()).cast(),
                self.slots,
            )
        }
    }

    pub fn generation(&self) -> u64 {
        self.header().generation.load(Relaxed)
    }

    pub fn counting(&self) -> bool {
        self.header().counting.load(Relaxed) != 0
    }

    /// The server-side counters of daemon group `name`, if the board keeps them.
    pub fn group(&self, name: &str) -> Option<&GroupCounters> {
        let groups = &self.header().groups;
        groups
            .iter()
            .take_while(|g| g.name_len.load(Relaxed) > 0)
            .find(|g| g.is(name.as_bytes()))
    }

    /// Takes a free slot for process `pid`, or that of a process that died
    /// without giving its slot back (its counters go to the retired ones first).
    pub fn claim(&self, pid: u32, threads: u32) -> Option<usize> {
        let slots = self.slots();
        let free = slots
            .iter()
            .position(|s| s.pid.compare_exchange(0, pid, AcqRel, Relaxed).is_ok());
        let index = free.or_else(|| {
            slots.iter().position(|s| {
                let old = s.pid.load(Relaxed);
                old != pid
                    && is_dead(old)
                    && s.pid.compare_exchange(old, pid, AcqRel, Relaxed).is_ok()
            })
        })?;
        let slot = &slots[index];
        slot.counters.fold_into(&self.header().retired);
        slot.begin(threads, State::Ready);
        Some(index)
    }

    /// Gives back slot `index` of a process that ends, keeping its counters in
    /// the retired ones.
    pub fn release(&self, index: usize) {
        let Some(slot) = self.slots().get(index) else {
            return;
        };
        slot.counters.fold_into(&self.header().retired);
        slot.pid.store(0, Release);
    }

    /// The supervisor's side: slot `index` for a new process (pid set at once after fork).
    pub fn prepare(&self, index: usize, threads: u32) {
        let slot = &self.slots()[index];
        slot.counters.fold_into(&self.header().retired);
        slot.begin(threads, State::Starting);
    }

    /// A free slot for a new process (the supervisor's), if any.
    pub fn free_slot(&self) -> Option<usize> {
        self.slots().iter().position(|s| s.pid.load(Relaxed) == 0)
    }

    /// Process `pid` in slot `index` ended (the supervisor reaped it):
    /// its counters go to the retired ones, and a restart of `reason` is counted.
    pub fn retire(&self, index: usize, reason: Option<Reason>) {
        if index >= self.slots().len() {
            return;
        }
        if let Some(reason) = reason {
            self.header().restarts[reason as usize].fetch_add(1, Relaxed);
        }
        self.release(index);
    }

    /// The slot of process `pid`, if it has one.
    pub fn find(&self, pid: u32) -> Option<usize> {
        self.slots().iter().position(|s| s.pid.load(Relaxed) == pid)
    }

    pub fn retired(&self) -> Totals {
        self.header().retired.load()
    }

    pub fn restarts(&self) -> Vec<(Reason, u64)> {
        Reason::ALL
            .into_iter()
            .map(|r| (r, self.header().restarts[r as usize].load(Relaxed)))
            .collect()
    }

    /// Copies of the slots in use.
    pub fn processes(&self) -> Vec<Process> {
        self.slots()
            .iter()
            .filter_map(|s| {
                let pid = s.pid.load(Acquire);
                (pid != 0).then(|| s.snapshot(pid))
            })
            .collect()
    }
}

impl Slot {
    fn begin(&self, threads: u32, state: State) {
        self.state.store(state as u32, Relaxed);
        self.reason.store(0, Relaxed);
        self.threads.store(threads, Relaxed);
        self.busy.store(0, Relaxed);
        self.started.store(unix_now(), Relaxed);
        self.rss_bytes.store(0, Relaxed);
        for r in &self.records {
            r.busy.store(0, Relaxed);
        }
    }

    pub fn set_pid(&self, pid: u32) {
        self.pid.store(pid, Release);
    }

    pub fn pid(&self) -> u32 {
        self.pid.load(Relaxed)
    }

    pub fn set_state(&self, state: State) {
        self.state.store(state as u32, Relaxed);
    }

    /// Why the process drains, as it tells.
    pub fn set_reason(&self, reason: Reason) {
        self.reason.store(reason as u32 + 1, Relaxed);
    }

    pub fn reason(&self) -> Option<Reason> {
        self.reason
            .load(Relaxed)
            .checked_sub(1)
            .and_then(Reason::from_code)
    }

    pub fn set_rss(&self, bytes: u64) {
        self.rss_bytes.store(bytes, Relaxed);
    }

    pub fn set_threads(&self, threads: u32) {
        self.threads.store(threads, Relaxed);
    }

    fn snapshot(&self, pid: u32) -> Process {
        Process {
            pid,
            state: State::from_code(self.state.load(Relaxed)),
            started: self.started.load(Relaxed),
            threads: self.threads.load(Relaxed),
            busy: self.busy.load(Relaxed),
            rss_bytes: self.rss_bytes.load(Relaxed),
            alive: !is_dead(pid),
            totals: self.counters.load(),
            current: self.records.iter().filter_map(Current::read).collect(),
        }
    }

    /// Starts counting a request of this process.
    pub fn begin_request(&'static self, method: &[u8], uri: &[u8]) -> Ticket {
        self.busy.fetch_add(1, Relaxed);
        let started_us = monotonic_us();
        let record = self
            .records
            .iter()
            .position(|r| r.busy.compare_exchange(0, 1, Acquire, Relaxed).is_ok());
        if let Some(i) = record {
            self.records[i].write(method, uri, started_us);
        }
        Ticket {
            slot: self,
            record,
            started_us,
            status: None,
        }
    }
}

/// A copy of one process's slot.
#[derive(Debug, Clone)]
pub struct Process {
    pub pid: u32,
    pub state: Option<State>,
    /// Unix time, seconds.
    pub started: u64,
    pub threads: u32,
    pub busy: u32,
    pub rss_bytes: u64,
    /// False for a process that died without giving its slot back.
    pub alive: bool,
    pub totals: Totals,
    pub current: Vec<Request>,
}

/// A request being counted: [`Ticket::finish`] with its status counts it;
/// dropped without (a panic), it counts as a 500.
pub struct Ticket {
    slot: &'static Slot,
    record: Option<usize>,
    started_us: u64,
    status: Option<u16>,
}

impl Ticket {
    pub fn finish(mut self, status: u16) {
        self.status = Some(status);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let us = monotonic_us().saturating_sub(self.started_us);
        self.slot.counters.record(self.status.unwrap_or(500), us);
        if let Some(i) = self.record {
            self.slot.records[i].busy.store(0, Release);
        }
        self.slot.busy.fetch_sub(1, Relaxed);
    }
}

/// This process's slot, where its requests are counted, and the board that
/// holds it; null when nothing is counted here.
static LOCAL: AtomicPtr<Slot> = AtomicPtr::new(std::ptr::null_mut());
static LOCAL_BOARD: AtomicPtr<Board> = AtomicPtr::new(std::ptr::null_mut());
/// The server's embedded board (made in the parent, inherited by its children).
static EMBEDDED: AtomicPtr<Board> = AtomicPtr::new(std::ptr::null_mut());

/// Makes `board` the server's embedded board (in the parent, before it forks),
/// in place of the previous generation's, which is unmapped here: the parent
/// runs no request, and its children keep their own mapping.
pub fn install_embedded(board: Option<Board>) {
    let new = board.map_or(std::ptr::null_mut(), |b| Box::into_raw(Box::new(b)));
    let old = EMBEDDED.swap(new, AcqRel);
    if !old.is_null() {
        // SAFETY: old came from Box::into_raw above and is no longer reachable
        // through EMBEDDED; the single-threaded parent holds no reference to it.
        drop(unsafe { Box::from_raw(old) });
    }
}

/// The server's embedded board, if status counting is on.
pub fn embedded() -> Option<&'static Board> {
    let p = EMBEDDED.load(Acquire);
    // SAFETY: a non-null pointer is a board leaked by install_embedded, which
    // only the parent replaces; server processes never do.
    (!p.is_null()).then(|| unsafe { &*p })
}

/// This process counts its requests in slot `index` of `board` (leaked: it
/// lives as long as the process).
pub fn set_local(board: &'static Board, index: usize) {
    if let Some(slot) = board.slots().get(index) {
        LOCAL_BOARD.store((board as *const Board).cast_mut(), Release);
        LOCAL.store((slot as *const Slot).cast_mut(), Release);
    }
}

/// This process's slot, if it counts its requests.
pub fn local() -> Option<&'static Slot> {
    let p = LOCAL.load(Acquire);
    // SAFETY: a non-null pointer is a slot of a board that set_local was given
    // for the rest of the process's life.
    (!p.is_null()).then(|| unsafe { &*p })
}

/// Claims a slot of the embedded board for this server process (at its start),
/// which then counts its embedded requests; `threads` it can run them on.
pub fn claim_embedded(threads: u32) {
    let Some(board) = embedded().filter(|b| b.counting()) else {
        return;
    };
    if let Some(index) = board.claim(std::process::id(), threads) {
        set_local(board, index);
    }
}

/// At this process's exit: its counters go to the board's retired ones and
/// its slot is free again.
pub fn release_local() {
    let slot = LOCAL.swap(std::ptr::null_mut(), AcqRel);
    let board = LOCAL_BOARD.load(Acquire);
    if slot.is_null() || board.is_null() {
        return;
    }
    // SAFETY: as in local(): the board lives as long as the process.
    let board = unsafe { &*board };
    if let Some(index) = board.find(std::process::id()) {
        board.release(index);
    }
}

/// Starts counting a request of this process, if it counts them.
pub fn begin(method: &[u8], uri: &[u8]) -> Option<Ticket> {
    local().map(|slot| slot.begin_request(method, uri))
}

/// The server-side counters of daemon group `name`, if counting is on.
pub fn group(name: &str) -> Option<&'static GroupCounters> {
    embedded().filter(|b| b.counting())?.group(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaked(board: Board) -> &'static Board {
        Box::leak(Box::new(board))
    }

    #[test]
    fn requests_count_by_class_and_bucket_and_show_while_running() {
        let board = leaked(Board::anonymous(4, true, &["g"]).unwrap());
        let i = board.claim(std::process::id(), 8).unwrap();
        let slot = &board.slots()[i];
        let long_uri = format!("/{}", "x".repeat(300));
        let t = slot.begin_request(b"GET", long_uri.as_bytes());
        let p = &board.processes()[0];
        assert_eq!(p.busy, 1);
        assert_eq!(p.current[0].method, "GET");
        assert_eq!(p.current[0].uri.len(), URI_MAX);
        t.finish(404);
        slot.begin_request(b"POST", b"/a").finish(200);
        drop(slot.begin_request(b"POST", b"/b"));
        let p = &board.processes()[0];
        assert!(p.current.is_empty());
        assert_eq!(p.busy, 0);
        assert_eq!(p.totals.requests, 3);
        assert_eq!(p.totals.classes, [0, 1, 0, 1, 1]);
        assert_eq!(p.totals.buckets[0], 3);
        board.release(i);
        assert!(board.processes().is_empty());
        assert_eq!(board.retired().requests, 3);
        assert!(board.group("g").is_some() && board.group("h").is_none());
    }

    #[test]
    fn a_dead_process_slot_is_reclaimed_and_its_counters_kept() {
        let board = Board::anonymous(1, true, &[]).unwrap();
        // A pid that cannot exist (above pid_max).
        let dead = 0x7fff_fff0;
        assert_eq!(board.claim(dead, 1), Some(0));
        board.slots()[0].counters.record(200, 10);
        assert_eq!(board.claim(std::process::id(), 1), Some(0));
        assert_eq!(board.retired().requests, 1);
        assert_eq!(board.claim(std::process::id() + 1, 1), None);
    }

    #[test]
    fn a_file_board_is_read_back_and_checked() {
        let path = std::env::temp_dir().join(format!("gateway-board-{}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let writer = Board::create_in(file.as_raw_fd(), 2, true).unwrap();
        writer.prepare(1, 4);
        writer.slots()[1].set_pid(42);
        writer.retire(1, Some(Reason::Crash));
        let reader = Board::open(&path).unwrap();
        assert_eq!(reader.generation(), writer.generation());
        assert_eq!(reader.restarts()[0], (Reason::Crash, 1));
        // A daemon process runs application code with the file mapped writable: a
        // slot count it writes changes no mapped board's bounds.
        writer.header().slots.store(1_000_000, Relaxed);
        assert_eq!((writer.slots().len(), reader.slots().len()), (2, 2));
        assert!(Board::open(&path).is_err());
        std::fs::write(&path, b"not a board").unwrap();
        assert!(Board::open(&path).is_err());
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn buckets_and_classes() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(5_000), 0);
        assert_eq!(bucket_of(5_001), 1);
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
        assert_eq!(class_of(101), 0);
        assert_eq!(class_of(599), 4);
        assert_eq!(class_of(0), 4);
    }
}
