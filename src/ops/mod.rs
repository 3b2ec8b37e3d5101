//! Operations: the status page. [`scoreboard`] keeps the counters and current
//! requests of every process in shared memory; [`render`] shows a
//! [`Snapshot`] of them as HTML, JSON or Prometheus text. Server- and
//! protocol-neutral: the servers map their status handler to it, the runners
//! count into it.

pub mod render;
pub mod scoreboard;

use std::path::PathBuf;

use scoreboard::{Board, GroupTotals, Process, Reason, Totals};

/// What the status page shows, copied from the boards at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// `apache` or `nginx`.
    pub server: &'static str,
    /// The monotonic clock when copied (microseconds), to tell elapsed times.
    pub now_us: u64,
    /// The server's own processes; None when counting is off.
    pub embedded: Option<Embedded>,
    pub groups: Vec<Group>,
}

#[derive(Debug, Clone)]
pub struct Embedded {
    pub processes: Vec<Process>,
    /// Live and ended processes together.
    pub totals: Totals,
}

/// One daemon group.
#[derive(Debug, Clone)]
pub struct Group {
    pub name: String,
    /// Why its status file cannot be read, if it cannot.
    pub unavailable: Option<String>,
    pub counting: bool,
    pub processes: Vec<Process>,
    /// Live and ended processes together.
    pub totals: Totals,
    pub restarts: Vec<(Reason, u64)>,
    /// What the server processes counted for the group.
    pub server: GroupTotals,
}

impl Group {
    /// Busy and idle threads of its live processes.
    pub fn threads(&self) -> (u64, u64) {
        threads_of(&self.processes)
    }
}

impl Embedded {
    pub fn threads(&self) -> (u64, u64) {
        threads_of(&self.processes)
    }
}

fn threads_of(processes: &[Process]) -> (u64, u64) {
    processes
        .iter()
        .filter(|p| p.alive)
        .fold((0, 0), |(b, i), p| {
            let busy = u64::from(p.busy);
            (b + busy, i + u64::from(p.threads).saturating_sub(busy))
        })
}

fn totals_of(board: &Board, processes: &[Process]) -> Totals {
    let mut totals = board.retired();
    for p in processes {
        totals.add(&p.totals);
    }
    totals
}

/// Copies the embedded board and the status file of each daemon group
/// (`groups`: name and file).
pub fn collect(server: &'static str, groups: &[(String, PathBuf)]) -> Snapshot {
    let embedded = scoreboard::embedded()
        .filter(|b| b.counting())
        .map(|board| {
            let processes = board.processes();
            Embedded {
                totals: totals_of(board, &processes),
                processes,
            }
        });
    let groups = groups
        .iter()
        .map(|(name, path)| {
            let server = scoreboard::group(name)
                .map(|g| g.load())
                .unwrap_or_default();
            let mut group = Group {
                name: name.clone(),
                unavailable: None,
                counting: false,
                processes: Vec::new(),
                totals: Totals::default(),
                restarts: Vec::new(),
                server,
            };
            match Board::open(path) {
                Ok(board) => {
                    group.processes = board.processes();
                    group.totals = totals_of(&board, &group.processes);
                    group.restarts = board.restarts();
                    group.counting = board.counting();
                }
                Err(e) => group.unavailable = Some(format!("{}: {e}", path.display())),
            }
            group
        })
        .collect();
    Snapshot {
        server,
        now_us: scoreboard::monotonic_us(),
        embedded,
        groups,
    }
}
