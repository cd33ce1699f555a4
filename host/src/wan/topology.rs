//! Geo topologies: regions, the replicas in each, and the round trips
//! between regions, read from a TOML file (`examples/wan/*.toml`).
//!
//! ```toml
//! version = 1
//! [[region]]
//! name = "virginia"          # replicas = 1 unless said
//! [[region]]
//! name = "ohio"
//! [[link]]
//! between = ["virginia", "ohio"]
//! rtt_ms = 10                # round trip; each direction gets half
//! jitter_ms = 1              # up to this much more per packet, each way
//! loss = 0.0                 # share of datagrams dropped, each way
//! ```
//!
//! Replicas are numbered from 1 in the order of the regions. Every two
//! regions need a link; replicas of one region reach each other through
//! `local_rtt_ms` (0 unless said).

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use super::Link;

/// The one format this code reads.
const VERSION: u32 = 1;
/// Bounds on what a file may ask for.
const REGIONS_MAX: usize = 16;
const REPLICAS_MAX: u32 = 15;
const RTT_MAX_MS: f64 = 10_000.0;
const FILE_MAX: u64 = 64 * 1024;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    version: u32,
    #[serde(default)]
    local_rtt_ms: f64,
    region: Vec<RegionFile>,
    #[serde(default)]
    link: Vec<LinkFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegionFile {
    name: String,
    #[serde(default = "one")]
    replicas: u32,
}

fn one() -> u32 {
    1
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LinkFile {
    between: [String; 2],
    rtt_ms: f64,
    #[serde(default)]
    jitter_ms: f64,
    #[serde(default)]
    loss: f64,
}

/// A region and the replicas in it.
#[derive(Clone, Debug, PartialEq)]
pub struct Region {
    pub name: String,
    /// Replica ids, ascending.
    pub replicas: Vec<u32>,
}

/// Both directions of the path between two regions.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Route {
    rtt: Duration,
    jitter: Duration,
    loss: f64,
}

/// A geo layout of one cluster.
#[derive(Clone, Debug, PartialEq)]
pub struct Topology {
    pub regions: Vec<Region>,
    /// `paths[a][b]`: between regions a and b (a == b: within a region).
    paths: Vec<Vec<Route>>,
}

impl Topology {
    /// Reads a topology file.
    pub fn load(path: &Path) -> Result<Topology, String> {
        let size = std::fs::metadata(path)
            .map_err(|e| format!("{}: {e}", path.display()))?
            .len();
        if size > FILE_MAX {
            return Err(format!(
                "{}: {size} bytes, more than a topology needs ({FILE_MAX})",
                path.display()
            ));
        }
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Topology::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses and checks a topology.
    pub fn parse(text: &str) -> Result<Topology, String> {
        let file: File = toml::from_str(text).map_err(|e| e.to_string())?;
        if file.version != VERSION {
            return Err(format!(
                "topology version {} (this ballot reads version {VERSION})",
                file.version
            ));
        }
        if file.region.is_empty() || file.region.len() > REGIONS_MAX {
            return Err(format!(
                "1 to {REGIONS_MAX} regions, not {}",
                file.region.len()
            ));
        }
        let mut regions: Vec<Region> = Vec::new();
        let mut next = 1;
        for r in &file.region {
            if r.name.is_empty()
                || r.name.len() > 32
                || !r
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(format!(
                    "region name {:?}: 1 to 32 letters, digits, '-' or '_'",
                    r.name
                ));
            }
            if regions.iter().any(|x| x.name == r.name) {
                return Err(format!("region {:?} is named twice", r.name));
            }
            if r.replicas == 0 {
                return Err(format!("region {:?} has no replica", r.name));
            }
            if r.replicas > REPLICAS_MAX + 1 - next {
                return Err(format!("more than {REPLICAS_MAX} replicas"));
            }
            regions.push(Region {
                name: r.name.clone(),
                replicas: (next..next + r.replicas).collect(),
            });
            next += r.replicas;
        }
        let ms = |what: &str, v: f64| {
            if (0.0..=RTT_MAX_MS).contains(&v) {
                Ok(Duration::from_secs_f64(v / 1000.0))
            } else {
                Err(format!("{what} {v} ms: 0 to {RTT_MAX_MS} ms"))
            }
        };
        let local = Route {
            rtt: ms("local_rtt_ms", file.local_rtt_ms)?,
            jitter: Duration::ZERO,
            loss: 0.0,
        };
        let n = regions.len();
        let mut paths: Vec<Vec<Option<Route>>> = vec![vec![None; n]; n];
        for (i, row) in paths.iter_mut().enumerate() {
            row[i] = Some(local);
        }
        let index = |name: &str| {
            regions
                .iter()
                .position(|r| r.name == name)
                .ok_or_else(|| format!("a link names region {name:?}, which is not listed"))
        };
        for l in &file.link {
            let (a, b) = (index(&l.between[0])?, index(&l.between[1])?);
            if a == b {
                return Err(format!("a link from {:?} to itself", l.between[0]));
            }
            if paths[a][b].is_some() {
                return Err(format!(
                    "the link between {:?} and {:?} is given twice",
                    l.between[0], l.between[1]
                ));
            }
            if !(0.0..1.0).contains(&l.loss) {
                return Err(format!("loss {}: from 0 up to (not including) 1", l.loss));
            }
            let path = Route {
                rtt: ms("rtt_ms", l.rtt_ms)?,
                jitter: ms("jitter_ms", l.jitter_ms)?,
                loss: l.loss,
            };
            paths[a][b] = Some(path);
            paths[b][a] = Some(path);
        }
        let mut full = Vec::with_capacity(n);
        for (a, row) in paths.into_iter().enumerate() {
            let mut out = Vec::with_capacity(n);
            for (b, p) in row.into_iter().enumerate() {
                out.push(p.ok_or_else(|| {
                    format!(
                        "no link between {:?} and {:?}",
                        regions[a].name, regions[b].name
                    )
                })?);
            }
            full.push(out);
        }
        Ok(Topology {
            regions,
            paths: full,
        })
    }

    /// Replicas in all.
    pub fn nodes(&self) -> u32 {
        self.regions.iter().map(|r| r.replicas.len() as u32).sum()
    }

    /// The region replica `id` is in.
    pub fn region_of(&self, id: u32) -> Option<usize> {
        self.regions.iter().position(|r| r.replicas.contains(&id))
    }

    /// Round trip between two replicas (0 to itself).
    pub fn rtt(&self, a: u32, b: u32) -> Duration {
        match (self.region_of(a), self.region_of(b)) {
            _ if a == b => Duration::ZERO,
            (Some(x), Some(y)) => self.paths[x][y].rtt,
            _ => Duration::ZERO,
        }
    }

    /// Every directed link between two replicas: (from, to, link), half
    /// the round trip each way.
    pub fn links(&self) -> Vec<(u32, u32, Link)> {
        let mut out = Vec::new();
        for (x, rx) in self.regions.iter().enumerate() {
            for (y, ry) in self.regions.iter().enumerate() {
                let p = self.paths[x][y];
                for &from in &rx.replicas {
                    for &to in ry.replicas.iter().filter(|&&to| to != from) {
                        out.push((
                            from,
                            to,
                            Link {
                                delay: p.rtt / 2,
                                jitter: p.jitter,
                                loss: p.loss,
                                up: true,
                            },
                        ));
                    }
                }
            }
        }
        out
    }

    /// Round timeouts that fit this layout, in ms: (fast, round). A fast
    /// round waits 1.5 times the round trip to the farthest replica it
    /// needs, plus twice the largest jitter, so it does not time out on a
    /// healthy path; a classic round or a forward waits twice the longest
    /// round trip, four times the jitter and 50 ms more. Never below the
    /// defaults (50, 200), never above a minute.
    pub fn timeouts(&self) -> (u32, u32) {
        let n = self.nodes() as usize;
        let fast_quorum = ballot_core::quorum_fast(n);
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let jitter = self
            .paths
            .iter()
            .flatten()
            .map(|p| ms(p.jitter))
            .fold(0.0, f64::max);
        let widest = (0..self.regions.len())
            .map(|r| ms(self.floor(r, fast_quorum)))
            .fold(0.0, f64::max);
        let longest = self
            .paths
            .iter()
            .flatten()
            .map(|p| ms(p.rtt))
            .fold(0.0, f64::max);
        // At most a minute, as a replica's configuration allows.
        let fast = (1.5 * widest + 2.0 * jitter).ceil().clamp(50.0, 60_000.0) as u32;
        let round = (2.0 * longest + 4.0 * jitter + 50.0)
            .ceil()
            .clamp(200.0, 60_000.0) as u32;
        (fast, round)
    }

    /// The physical floor of a write from `region`: the round trip from
    /// its first replica to the nearest `quorum` replicas (itself counted,
    /// at 0), jitter left out.
    pub fn floor(&self, region: usize, quorum: usize) -> Duration {
        let Some(&from) = self.regions[region].replicas.first() else {
            return Duration::ZERO;
        };
        let mut rtts: Vec<Duration> = (1..=self.nodes()).map(|to| self.rtt(from, to)).collect();
        rtts.sort();
        rtts.get(quorum.max(1) - 1)
            .copied()
            .unwrap_or(Duration::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const THREE: &str = r#"
version = 1
[[region]]
name = "a"
[[region]]
name = "b"
replicas = 2
[[region]]
name = "c"
[[link]]
between = ["a", "b"]
rtt_ms = 10
jitter_ms = 1
[[link]]
between = ["c", "b"]
rtt_ms = 40
[[link]]
between = ["a", "c"]
rtt_ms = 70
loss = 0.01
"#;

    #[test]
    fn a_topology_numbers_replicas_by_region_and_halves_round_trips() {
        let t = Topology::parse(THREE).unwrap();
        assert_eq!(t.nodes(), 4);
        assert_eq!(t.regions[1].replicas, vec![2, 3]);
        assert_eq!(t.region_of(4), Some(2));
        assert_eq!(t.rtt(1, 4), Duration::from_millis(70));
        assert_eq!(t.rtt(2, 3), Duration::ZERO);
        let links = t.links();
        assert_eq!(links.len(), 4 * 3);
        let l = links
            .iter()
            .find(|(f, to, _)| (*f, *to) == (4, 1))
            .unwrap()
            .2;
        assert_eq!((l.delay, l.loss), (Duration::from_millis(35), 0.01));
        let l = links
            .iter()
            .find(|(f, to, _)| (*f, *to) == (2, 1))
            .unwrap()
            .2;
        assert_eq!(
            (l.delay, l.jitter),
            (Duration::from_millis(5), Duration::from_millis(1))
        );
        // From a: itself 0, b's two replicas at 10, c at 70.
        assert_eq!(t.floor(0, 3), Duration::from_millis(10));
        assert_eq!(t.floor(0, 4), Duration::from_millis(70));
        assert_eq!(t.floor(2, 3), Duration::from_millis(40));
        // Four replicas: a fast quorum is 3, whose farthest is 40 ms from c
        // (the widest), so fast rounds wait 60 ms plus twice the jitter;
        // rounds 2 x 70 + 4 + 50 = 194, raised to the default 200.
        assert_eq!(t.timeouts(), (62, 200));
    }

    #[test]
    fn a_topology_that_does_not_hold_together_is_refused_with_its_reason() {
        let cases = [
            (THREE.replace("version = 1", "version = 2"), "version 2"),
            (THREE.replace("name = \"c\"", "name = \"a\""), "named twice"),
            (
                THREE.replace("between = [\"a\", \"c\"]", "between = [\"a\", \"b\"]"),
                "given twice",
            ),
            (THREE.replace("loss = 0.01", "loss = 1.0"), "loss"),
            (THREE.replace("rtt_ms = 40", "rtt_ms = -4"), "rtt_ms -4"),
            (
                THREE.replace("between = [\"c\", \"b\"]", "between = [\"c\", \"x\"]"),
                "\"x\"",
            ),
            (THREE.replace("replicas = 2", "replicas = 0"), "no replica"),
            (
                THREE.replace("replicas = 2", "replicas = 4000000000"),
                "more than 15 replicas",
            ),
            (THREE.replace("jitter_ms = 1", "jiter_ms = 1"), "jiter_ms"),
            (
                THREE.replace("name = \"b\"", "name = \"b b\""),
                "region name",
            ),
        ];
        for (text, needle) in cases {
            let e = Topology::parse(&text).unwrap_err();
            assert!(e.contains(needle), "{needle:?} not in {e:?}");
        }
        let missing = THREE.replace(
            "[[link]]\nbetween = [\"a\", \"c\"]\nrtt_ms = 70\nloss = 0.01\n",
            "",
        );
        let e = Topology::parse(&missing).unwrap_err();
        assert!(e.contains("no link between \"a\" and \"c\""), "{e}");
    }

    /// The shipped topologies parse (they are the files README and design
    /// name), with the round trips they say.
    #[test]
    fn the_shipped_topologies_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/wan");
        let three = Topology::load(&dir.join("3-regions.toml")).unwrap();
        assert_eq!(three.nodes(), 3);
        let mut rtts: Vec<u128> = [(1, 2), (1, 3), (2, 3)]
            .iter()
            .map(|&(a, b)| three.rtt(a, b).as_millis())
            .collect();
        rtts.sort();
        assert_eq!(rtts, vec![10, 40, 70]);
        let five = Topology::load(&dir.join("5-regions.toml")).unwrap();
        assert_eq!(five.nodes(), 5);
    }
}
