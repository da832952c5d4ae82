//! Overlay ping traces for recovery drills: a `ping -D -i 0.05` taken
//! while a test breaks something (moves a node, flushes a NAT), and the
//! gaps in it.

use std::time::{SystemTime, UNIX_EPOCH};

use netsim::mesh::{s, MeshLab};

/// Seconds since the Unix epoch, as `ping -D` prints them.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// When each echo reply arrived (Unix seconds), in order.
#[derive(Debug, Clone)]
pub struct Trace {
    /// Reply times.
    pub replies: Vec<f64>,
    /// When the trace started.
    pub start: f64,
}

impl Trace {
    /// Seconds from `t` to the first reply after it (`None`: none came).
    pub fn first_after(&self, t: f64) -> Option<f64> {
        self.replies.iter().find(|&&r| r > t).map(|r| r - t)
    }

    /// The longest silence between replies after `t` (from `t` itself to
    /// the first reply counts too).
    pub fn longest_gap_after(&self, t: f64) -> f64 {
        let mut prev = t;
        let mut worst: f64 = 0.0;
        for &r in self.replies.iter().filter(|&&r| r > t) {
            worst = worst.max(r - prev);
            prev = r;
        }
        worst
    }
}

/// Pings node `j`'s overlay address from node `i` every 50 ms for `secs`
/// seconds and returns when each reply came (blocks for `secs`).
pub fn ping_trace(m: &MeshLab, i: usize, j: usize, secs: u32) -> Trace {
    let start = unix_now();
    let (_, out) = m
        .lab
        .exec(
            &m.nodes[i].name,
            &[
                s("ping"),
                s("-D"),
                s("-n"),
                s("-i"),
                s("0.05"),
                s("-w"),
                s(secs),
                s("-W"),
                s(1),
                s(m.nodes[j].overlay),
            ],
        )
        .expect("exec ping");
    Trace {
        replies: reply_times(&out),
        start,
    }
}

/// When each answer in a `ping -D` log arrived (Unix seconds).
pub fn reply_times(log: &str) -> Vec<f64> {
    log.lines()
        .filter(|l| l.contains("bytes from"))
        .filter_map(|l| {
            let ts = l.strip_prefix('[')?.split(']').next()?;
            ts.parse::<f64>().ok()
        })
        .collect()
}
