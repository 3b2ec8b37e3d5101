//! The status page in three formats, from a [`Snapshot`]: HTML for a browser
//! (one plain table per section, no script), JSON, and the Prometheus text
//! exposition format (version 0.0.4). Hand-rolled: the formats are small and
//! fixed, and a crate for each would weigh more than the encoders.

use std::fmt::Write;

use super::scoreboard::{Process, Totals, BUCKET_BOUNDS_US};
use super::{Group, Snapshot};

/// What a status request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Html,
    Json,
    Prometheus,
}

impl Format {
    /// `?json`, `?prometheus`, or a Prometheus scraper's `Accept:
    /// text/plain; version=0.0.4`; HTML otherwise.
    pub fn choose(query: &[u8], accept: Option<&[u8]>) -> Format {
        let asks = |name: &[u8]| {
            query
                .split(|&b| b == b'&')
                .any(|p| p == name || p.starts_with(&[name, b"="].concat()))
        };
        if asks(b"json") {
            return Format::Json;
        }
        if asks(b"prometheus") {
            return Format::Prometheus;
        }
        let accept = String::from_utf8_lossy(accept.unwrap_or_default()).to_ascii_lowercase();
        if accept.contains("text/plain") && accept.contains("version=0.0.4") {
            Format::Prometheus
        } else {
            Format::Html
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Html => "text/html; charset=utf-8",
            Format::Json => "application/json",
            Format::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

/// The page for `snapshot` in `format`.
pub fn render(snapshot: &Snapshot, format: Format) -> String {
    match format {
        Format::Html => html(snapshot),
        Format::Json => json(snapshot),
        Format::Prometheus => prometheus(snapshot),
    }
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// A bucket's upper bound as Prometheus writes it.
fn le(i: usize) -> String {
    match BUCKET_BOUNDS_US.get(i) {
        // Always with a decimal point, as Prometheus clients write bounds: 1.0, 0.005.
        Some(us) => format!("{:?}", *us as f64 / 1e6),
        None => "+Inf".into(),
    }
}

fn seconds(us: u64) -> f64 {
    us as f64 / 1e6
}

fn elapsed(snapshot: &Snapshot, started_us: u64) -> f64 {
    seconds(snapshot.now_us.saturating_sub(started_us))
}

// --- JSON ---

fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn json_totals(t: &Totals) -> String {
    let classes: Vec<String> = CLASSES
        .iter()
        .zip(t.classes)
        .map(|(c, n)| format!("\"{c}\":{n}"))
        .collect();
    let mut cumulative = 0;
    let buckets: Vec<String> = t
        .buckets
        .iter()
        .enumerate()
        .map(|(i, n)| {
            cumulative += n;
            format!("{{\"le\":{},\"count\":{cumulative}}}", json_str(&le(i)))
        })
        .collect();
    format!(
        "\"requests\":{},\"status_classes\":{{{}}},\"latency\":{{\"buckets\":[{}],\"sum_seconds\":{},\"count\":{}}}",
        t.requests,
        classes.join(","),
        buckets.join(","),
        seconds(t.sum_us),
        t.requests
    )
}

fn json_process(snapshot: &Snapshot, p: &Process) -> String {
    let current: Vec<String> = p
        .current
        .iter()
        .map(|r| {
            format!(
                "{{\"method\":{},\"uri\":{},\"elapsed\":{:.3}}}",
                json_str(&r.method),
                json_str(&r.uri),
                elapsed(snapshot, r.started_us)
            )
        })
        .collect();
    let state = p.state.map_or("", |s| s.name());
    format!(
        "{{\"pid\":{},\"state\":{},\"started\":{},\"threads\":{},\"busy_threads\":{},\"idle_threads\":{},\"rss_bytes\":{},{},\"current\":[{}]}}",
        p.pid,
        json_str(state),
        p.started,
        p.threads,
        p.busy,
        p.threads.saturating_sub(p.busy),
        p.rss_bytes,
        json_totals(&p.totals),
        current.join(",")
    )
}

fn json_processes(snapshot: &Snapshot, processes: &[Process]) -> String {
    // A process that died without giving its slot back shows in the totals only.
    let all: Vec<String> = processes
        .iter()
        .filter(|p| p.alive)
        .map(|p| json_process(snapshot, p))
        .collect();
    format!("[{}]", all.join(","))
}

fn json_group(snapshot: &Snapshot, g: &Group) -> String {
    let (busy, idle) = g.threads();
    let restarts: Vec<String> = g
        .restarts
        .iter()
        .map(|(r, n)| format!("\"{}\":{n}", r.name()))
        .collect();
    format!(
        "{{\"name\":{},\"available\":{},\"error\":{},\"counting\":{},\"busy_threads\":{busy},\"idle_threads\":{idle},\"queue\":{{\"now\":{},\"max\":{}}},\"shed_503\":{},\"timeouts_504\":{},\"restarts\":{{{}}},{},\"processes\":{}}}",
        json_str(&g.name),
        g.unavailable.is_none(),
        g.unavailable.as_deref().map_or("null".into(), json_str),
        g.counting,
        g.server.queued,
        g.server.queued_max,
        g.server.shed,
        g.server.timeouts,
        restarts.join(","),
        json_totals(&g.totals),
        json_processes(snapshot, &g.processes)
    )
}

fn json(snapshot: &Snapshot) -> String {
    let embedded = snapshot.embedded.as_ref().map_or("null".into(), |e| {
        let (busy, idle) = e.threads();
        format!(
            "{{\"busy_threads\":{busy},\"idle_threads\":{idle},{},\"processes\":{}}}",
            json_totals(&e.totals),
            json_processes(snapshot, &e.processes)
        )
    });
    let groups: Vec<String> = snapshot
        .groups
        .iter()
        .map(|g| json_group(snapshot, g))
        .collect();
    format!(
        "{{\"server\":{},\"version\":{},\"embedded\":{embedded},\"groups\":[{}]}}\n",
        json_str(snapshot.server),
        json_str(crate::common::VERSION),
        groups.join(",")
    )
}

// --- Prometheus ---

/// Label pairs as Prometheus writes them, values escaped.
fn labels(pairs: &[(&str, &str)]) -> String {
    let all: Vec<String> = pairs
        .iter()
        .map(|(k, v)| {
            let v = v
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            format!("{k}=\"{v}\"")
        })
        .collect();
    format!("{{{}}}", all.join(","))
}

/// One section of the page: the embedded processes or a daemon group.
struct Section<'a> {
    base: Vec<(&'static str, &'a str)>,
    processes: &'a [Process],
    totals: &'a Totals,
    group: Option<&'a Group>,
}

fn sections(snapshot: &Snapshot) -> Vec<Section<'_>> {
    let mut out = Vec::new();
    if let Some(e) = &snapshot.embedded {
        out.push(Section {
            base: vec![("mode", "embedded")],
            processes: &e.processes,
            totals: &e.totals,
            group: None,
        });
    }
    for g in &snapshot.groups {
        out.push(Section {
            base: vec![("mode", "daemon"), ("group", g.name.as_str())],
            processes: &g.processes,
            totals: &g.totals,
            group: Some(g),
        });
    }
    out
}

/// Writes one metric family: its help, type, and the samples `each` gives per section.
fn family(
    out: &mut String,
    sections: &[Section<'_>],
    name: &str,
    kind: &str,
    help: &str,
    each: impl Fn(&Section<'_>, &mut Vec<(String, Vec<(&str, String)>, String)>),
) {
    let mut samples = Vec::new();
    for s in sections {
        each(s, &mut samples);
    }
    if samples.is_empty() {
        return;
    }
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (suffix, extra, value) in samples {
        let _ = writeln!(out, "{name}{suffix}{} {value}", labels_with(&extra));
    }
}

fn labels_with(pairs: &[(&str, String)]) -> String {
    let borrowed: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
    labels(&borrowed)
}

fn base(s: &Section<'_>) -> Vec<(&'static str, String)> {
    s.base.iter().map(|(k, v)| (*k, v.to_string())).collect()
}

fn with(s: &Section<'_>, more: &[(&'static str, String)]) -> Vec<(&'static str, String)> {
    let mut l = base(s);
    l.extend(more.iter().cloned());
    l
}

type Samples<'x> = Vec<(String, Vec<(&'x str, String)>, String)>;

fn sample(samples: &mut Samples<'_>, labels: Vec<(&'static str, String)>, value: impl ToString) {
    samples.push((String::new(), labels, value.to_string()));
}

fn prometheus(snapshot: &Snapshot) -> String {
    let sections = sections(snapshot);
    let mut out = String::new();
    family(
        &mut out,
        &sections,
        "gateway_requests_total",
        "counter",
        "Requests served, by status class.",
        |s, v| {
            for (c, n) in CLASSES.iter().zip(s.totals.classes) {
                sample(v, with(s, &[("class", c.to_string())]), n);
            }
        },
    );
    family(
        &mut out,
        &sections,
        "gateway_request_duration_seconds",
        "histogram",
        "Time from a request's start to its end.",
        |s, v| {
            let mut cumulative = 0;
            for (i, n) in s.totals.buckets.iter().enumerate() {
                cumulative += n;
                v.push((
                    "_bucket".into(),
                    with(s, &[("le", le(i))]),
                    cumulative.to_string(),
                ));
            }
            v.push(("_sum".into(), base(s), seconds(s.totals.sum_us).to_string()));
            v.push(("_count".into(), base(s), s.totals.requests.to_string()));
        },
    );
    process_families(&mut out, &sections);
    group_families(&mut out, &sections);
    out
}

fn process_families(out: &mut String, sections: &[Section<'_>]) {
    let alive = |s: &Section<'_>| s.processes.iter().filter(|p| p.alive).count();
    family(
        out,
        sections,
        "gateway_processes",
        "gauge",
        "Processes running.",
        |s, v| sample(v, base(s), alive(s)),
    );
    family(
        out,
        sections,
        "gateway_busy_threads",
        "gauge",
        "Threads running a request.",
        |s, v| {
            let busy: u32 = s.processes.iter().filter(|p| p.alive).map(|p| p.busy).sum();
            sample(v, base(s), busy)
        },
    );
    family(
        out,
        sections,
        "gateway_idle_threads",
        "gauge",
        "Threads waiting for a request.",
        |s, v| {
            let idle: u32 = s
                .processes
                .iter()
                .filter(|p| p.alive)
                .map(|p| p.threads.saturating_sub(p.busy))
                .sum();
            sample(v, base(s), idle)
        },
    );
    per_process_families(out, sections);
}

/// The families with one sample per live process.
fn per_process_families(out: &mut String, sections: &[Section<'_>]) {
    let per_process = |f: fn(&Process) -> String| {
        move |s: &Section<'_>, v: &mut Samples<'_>| {
            for p in s.processes.iter().filter(|p| p.alive) {
                sample(v, with(s, &[("pid", p.pid.to_string())]), f(p));
            }
        }
    };
    family(
        out,
        sections,
        "gateway_process_requests_total",
        "counter",
        "Requests a process served.",
        per_process(|p| p.totals.requests.to_string()),
    );
    family(
        out,
        sections,
        "gateway_process_busy_threads",
        "gauge",
        "Threads of a process running a request.",
        per_process(|p| p.busy.to_string()),
    );
    family(
        out,
        sections,
        "gateway_process_start_time_seconds",
        "gauge",
        "When a process started, in seconds since the epoch.",
        per_process(|p| p.started.to_string()),
    );
    family(
        out,
        sections,
        "gateway_process_resident_memory_bytes",
        "gauge",
        "Resident memory of a daemon process.",
        |s, v| {
            if s.group.is_some() {
                for p in s.processes.iter().filter(|p| p.alive) {
                    sample(v, with(s, &[("pid", p.pid.to_string())]), p.rss_bytes);
                }
            }
        },
    );
}

fn group_families(out: &mut String, sections: &[Section<'_>]) {
    let groups = |f: fn(&Group, &Section<'_>, &mut Samples<'_>)| {
        move |s: &Section<'_>, v: &mut Samples<'_>| {
            if let Some(g) = s.group {
                f(g, s, v)
            }
        }
    };
    family(
        out,
        sections,
        "gateway_queue_length",
        "gauge",
        "Requests waiting for a daemon process to take them.",
        groups(|g, s, v| sample(v, base(s), g.server.queued)),
    );
    family(
        out,
        sections,
        "gateway_queue_length_max",
        "gauge",
        "The longest the queue has been.",
        groups(|g, s, v| sample(v, base(s), g.server.queued_max)),
    );
    family(
        out,
        sections,
        "gateway_shed_total",
        "counter",
        "Requests answered 503: the group was overloaded or not running.",
        groups(|g, s, v| sample(v, base(s), g.server.shed)),
    );
    family(
        out,
        sections,
        "gateway_timeouts_total",
        "counter",
        "Requests answered 504: request-timeout or socket-timeout passed.",
        groups(|g, s, v| sample(v, base(s), g.server.timeouts)),
    );
    family(
        out,
        sections,
        "gateway_restarts_total",
        "counter",
        "Daemon processes replaced, by reason.",
        groups(|g, s, v| {
            for (r, n) in &g.restarts {
                sample(v, with(s, &[("reason", r.name().to_string())]), n);
            }
        }),
    );
}

// --- HTML ---

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn html_processes(out: &mut String, snapshot: &Snapshot, processes: &[Process], daemon: bool) {
    out.push_str("<table>\n<tr><th>pid</th><th>state</th><th>started</th><th>busy</th><th>idle</th><th>requests</th>");
    for c in CLASSES {
        let _ = write!(out, "<th>{c}</th>");
    }
    if daemon {
        out.push_str("<th>RSS (MiB)</th>");
    }
    out.push_str("<th>current requests</th></tr>\n");
    for p in processes.iter().filter(|p| p.alive) {
        let state = p.state.map_or("", |s| s.name());
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{state}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>",
            p.pid,
            p.started,
            p.busy,
            p.threads.saturating_sub(p.busy),
            p.totals.requests
        );
        for n in p.totals.classes {
            let _ = write!(out, "<td>{n}</td>");
        }
        if daemon {
            let _ = write!(out, "<td>{:.1}</td>", p.rss_bytes as f64 / 1048576.0);
        }
        let current: Vec<String> = p
            .current
            .iter()
            .map(|r| {
                format!(
                    "{} {} ({:.1}s)",
                    esc(&r.method),
                    esc(&r.uri),
                    elapsed(snapshot, r.started_us)
                )
            })
            .collect();
        let _ = writeln!(out, "<td>{}</td></tr>", current.join("<br>"));
    }
    out.push_str("</table>\n");
}

fn html_totals(out: &mut String, t: &Totals) {
    let _ = write!(out, "<p>Requests: {}", t.requests);
    for (c, n) in CLASSES.iter().zip(t.classes) {
        let _ = write!(out, ", {c}: {n}");
    }
    let mean = if t.requests > 0 {
        seconds(t.sum_us) / t.requests as f64
    } else {
        0.0
    };
    let _ = writeln!(out, "; mean time {mean:.3}s</p>");
}

fn html_group(out: &mut String, snapshot: &Snapshot, g: &Group) {
    let _ = writeln!(out, "<h2>Daemon group {}</h2>", esc(&g.name));
    if let Some(why) = &g.unavailable {
        let _ = writeln!(out, "<p>Status not available: {}</p>", esc(why));
        return;
    }
    let (busy, idle) = g.threads();
    let _ = writeln!(
        out,
        "<p>Threads busy: {busy}, idle: {idle}; queue now: {}, highest: {}; 503 shed: {}; 504 timeouts: {}</p>",
        g.server.queued, g.server.queued_max, g.server.shed, g.server.timeouts
    );
    html_totals(out, &g.totals);
    let restarts: Vec<String> = g
        .restarts
        .iter()
        .map(|(r, n)| format!("{}: {n}", r.name()))
        .collect();
    let _ = writeln!(out, "<p>Restarts: {}</p>", restarts.join(", "));
    html_processes(out, snapshot, &g.processes, true);
}

fn html(snapshot: &Snapshot) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Gateway status</title>\n\
         <style>table{{border-collapse:collapse}}td,th{{border:1px solid #999;padding:2px 6px;text-align:left}}</style>\n\
         </head><body>\n<h1>Gateway/{} status ({})</h1>",
        crate::common::VERSION,
        snapshot.server
    );
    match &snapshot.embedded {
        Some(e) => {
            out.push_str("<h2>Server processes (embedded)</h2>\n");
            html_totals(&mut out, &e.totals);
            html_processes(&mut out, snapshot, &e.processes, false);
        }
        None => out.push_str("<p>Embedded status counters are off.</p>\n"),
    }
    for g in &snapshot.groups {
        html_group(&mut out, snapshot, g);
    }
    out.push_str("</body></html>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::super::scoreboard::{GroupTotals, Reason, Request, State};
    use super::super::Embedded;
    use super::*;

    fn snapshot() -> Snapshot {
        let mut totals = Totals {
            requests: 3,
            classes: [0, 2, 0, 1, 0],
            sum_us: 12_000_000,
            ..Default::default()
        };
        totals.buckets[0] = 2;
        totals.buckets[11] = 1;
        let process = Process {
            pid: 7,
            state: Some(State::Ready),
            started: 100,
            threads: 4,
            busy: 1,
            rss_bytes: 1 << 20,
            alive: true,
            totals,
            current: vec![Request {
                method: "GET".into(),
                uri: "/slow?a=<b>&\"c\"".into(),
                started_us: 1_000_000,
            }],
        };
        Snapshot {
            server: "apache",
            now_us: 3_500_000,
            embedded: Some(Embedded {
                processes: vec![process.clone()],
                totals,
            }),
            groups: vec![Group {
                name: "g\"1".into(),
                unavailable: None,
                counting: true,
                processes: vec![process],
                totals,
                restarts: vec![(Reason::Crash, 2), (Reason::MaxRequests, 0)],
                server: GroupTotals {
                    shed: 5,
                    timeouts: 6,
                    queued: 1,
                    queued_max: 3,
                },
            }],
        }
    }

    #[test]
    fn the_format_follows_the_query_then_the_accept_header() {
        assert_eq!(Format::choose(b"json", None), Format::Json);
        assert_eq!(Format::choose(b"a=1&prometheus", None), Format::Prometheus);
        assert_eq!(
            Format::choose(b"", Some(b"text/plain; version=0.0.4")),
            Format::Prometheus
        );
        assert_eq!(Format::choose(b"", Some(b"text/html")), Format::Html);
        assert_eq!(Format::choose(b"jsonx", None), Format::Html);
    }

    #[test]
    fn json_carries_the_fields_escaped() {
        let j = json(&snapshot());
        assert!(
            j.contains("\"uri\":\"/slow?a=<b>&\\\"c\\\"\",\"elapsed\":2.500"),
            "{j}"
        );
        assert!(j.contains("\"name\":\"g\\\"1\""), "{j}");
        assert!(
            j.contains("\"status_classes\":{\"1xx\":0,\"2xx\":2,\"3xx\":0,\"4xx\":1,\"5xx\":0}")
        );
        assert!(j.contains("{\"le\":\"+Inf\",\"count\":3}"));
        assert!(j.contains("\"restarts\":{\"crash\":2,\"max-requests\":0}"));
        assert!(j.contains("\"queue\":{\"now\":1,\"max\":3},\"shed_503\":5,\"timeouts_504\":6"));
    }

    #[test]
    fn prometheus_families_are_whole_and_cumulative() {
        let p = prometheus(&snapshot());
        assert!(
            p.contains("gateway_requests_total{mode=\"embedded\",class=\"2xx\"} 2\n"),
            "{p}"
        );
        assert!(p.contains("gateway_request_duration_seconds_bucket{mode=\"daemon\",group=\"g\\\"1\",le=\"+Inf\"} 3\n"), "{p}");
        assert!(p.contains(
            "gateway_request_duration_seconds_bucket{mode=\"embedded\",le=\"0.005\"} 2\n"
        ));
        assert!(p.contains(
            "gateway_restarts_total{mode=\"daemon\",group=\"g\\\"1\",reason=\"crash\"} 2\n"
        ));
        // Each family's samples follow its TYPE line, never another's.
        let types = p.lines().filter(|l| l.starts_with("# TYPE")).count();
        let mut seen = std::collections::HashSet::new();
        for l in p.lines().filter(|l| l.starts_with("# TYPE")) {
            assert!(seen.insert(l.to_string()));
        }
        assert!(types >= 10);
    }

    #[test]
    fn html_escapes_what_it_shows() {
        let h = html(&snapshot());
        assert!(h.contains("<table>"));
        assert!(
            h.contains("GET /slow?a=&lt;b&gt;&amp;&quot;c&quot; (2.5s)"),
            "{h}"
        );
        assert!(!h.contains("<script"));
    }
}
