//! Several processes (machines) training one run: each process (a node) takes an equal
//! share of every update's batch, and their gradient vectors are summed over TCP through the
//! first node, the coordinator, which adds them in node order and sends the sum back. Every
//! node then runs the same host-side update on the same bytes, so all nodes stay identical
//! and each writes the same run directory.
//!
//! This is our own transport, not burn-collective's global all-reduce: that one hangs on its
//! second call in burn-collective 0.21.0 (DEVELOPERS.md, "Data-parallel training"). It
//! moves one vector per update (a few MB), which a star suits; the devices inside a node still
//! sum through burn-collective first.

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// How long the coordinator waits for the other nodes, and they for it, to join.
const JOIN_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a node waits for another's gradients (an update plus a checkpoint write).
const STEP_TIMEOUT: Duration = Duration::from_secs(1800);
/// The first bytes of every handshake, with the protocol's version.
const MAGIC: &[u8; 8] = b"MPRNODE1";

/// Which node this process is, of how many, and where the coordinator (node 0) listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nodes {
    /// How many processes take part.
    pub count: usize,
    /// This process's place, `0..count`; node 0 is the coordinator.
    pub rank: usize,
    /// `HOST:PORT` node 0 listens on and the others connect to.
    pub coordinator: String,
}

impl Nodes {
    /// One process: no network.
    pub fn single() -> Self {
        Nodes {
            count: 1,
            rank: 0,
            coordinator: String::new(),
        }
    }

    /// Refuses a rank outside `0..count` or several nodes without a coordinator.
    pub fn check(&self) -> Result<(), String> {
        if self.count == 0 || self.rank >= self.count {
            return Err(format!(
                "--node-rank {} is not one of the {} nodes (0..{})",
                self.rank, self.count, self.count
            ));
        }
        if self.count > 1 && self.coordinator.is_empty() {
            return Err("several nodes need --coordinator HOST:PORT".into());
        }
        Ok(())
    }

    /// Joins the other nodes. `run` fingerprints the run's inputs (model, configuration,
    /// calibration) and `step` is the update this node starts from: every node must agree on
    /// both, or the coordinator refuses them all with one line.
    pub fn join(&self, run: &str, step: u64) -> Result<NodeLink, String> {
        let hello = Hello {
            rank: self.rank as u32,
            count: self.count as u32,
            step,
            run: run.to_string(),
        };
        if self.rank == 0 {
            self.accept(&hello)
        } else {
            self.connect(&hello)
        }
    }

    fn accept(&self, own: &Hello) -> Result<NodeLink, String> {
        let at = &self.coordinator;
        let listener =
            TcpListener::bind(at).map_err(|e| format!("coordinator {at}: cannot listen: {e}"))?;
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + JOIN_TIMEOUT;
        let mut others: Vec<Option<Channel>> = (1..self.count).map(|_| None).collect();
        while others.iter().any(Option::is_none) {
            match listener.accept() {
                Ok((stream, _)) => {
                    stream.set_nonblocking(false).map_err(|e| e.to_string())?;
                    let mut ch = Channel::new(stream)?;
                    let hello =
                        Hello::read(&mut ch).map_err(|e| format!("coordinator {at}: {e}"))?;
                    let refusal = own.mismatch(&hello).or_else(|| {
                        others[hello.rank as usize - 1]
                            .is_some()
                            .then(|| format!("two nodes say they are node {}", hello.rank))
                    });
                    ch.write_reply(refusal.as_deref())?;
                    if let Some(why) = refusal {
                        return Err(format!("coordinator {at}: {why}"));
                    }
                    others[hello.rank as usize - 1] = Some(ch);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        let missing: Vec<String> = (1..self.count)
                            .filter(|k| others[k - 1].is_none())
                            .map(|k| k.to_string())
                            .collect();
                        return Err(format!(
                            "coordinator {at}: node(s) {} did not join within {} s",
                            missing.join(", "),
                            JOIN_TIMEOUT.as_secs()
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(format!("coordinator {at}: {e}")),
            }
        }
        Ok(NodeLink {
            rank: 0,
            channels: others.into_iter().map(|c| c.expect("joined")).collect(),
        })
    }

    fn connect(&self, own: &Hello) -> Result<NodeLink, String> {
        let at = &self.coordinator;
        let deadline = Instant::now() + JOIN_TIMEOUT;
        let stream = loop {
            match TcpStream::connect(at) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                Err(e) => {
                    return Err(format!(
                        "coordinator {at}: not reached within {} s: {e}",
                        JOIN_TIMEOUT.as_secs()
                    ))
                }
            }
        };
        let mut ch = Channel::new(stream)?;
        own.write(&mut ch)
            .map_err(|e| format!("coordinator {at}: {e}"))?;
        if let Some(why) = ch
            .read_reply()
            .map_err(|e| format!("coordinator {at}: {e}"))?
        {
            return Err(format!(
                "coordinator {at} refused node {}: {why}",
                self.rank
            ));
        }
        Ok(NodeLink {
            rank: self.rank,
            channels: vec![ch],
        })
    }
}

/// The joined nodes: the coordinator holds a channel to each other node (in node order), the
/// others one to the coordinator.
pub struct NodeLink {
    rank: usize,
    channels: Vec<Channel>,
}

impl NodeLink {
    /// The sum over every node of `values` (each node's own, already scaled), added in node
    /// order: the same bytes on every node. Every node must call it with as many values.
    pub fn sum(&mut self, values: Vec<f32>) -> Result<Vec<f32>, String> {
        if self.rank != 0 {
            let ch = &mut self.channels[0];
            ch.write_values(&values)
                .map_err(|e| e.to_string())
                .and_then(|()| ch.read_values(values.len()))
                .map_err(|e| format!("node {}: the coordinator: {e}", self.rank))
        } else {
            let mut sum = values;
            for (k, ch) in self.channels.iter_mut().enumerate() {
                let theirs = ch
                    .read_values(sum.len())
                    .map_err(|e| format!("coordinator: node {}: {e}", k + 1))?;
                sum.iter_mut().zip(theirs).for_each(|(s, v)| *s += v);
            }
            for (k, ch) in self.channels.iter_mut().enumerate() {
                ch.write_values(&sum)
                    .map_err(|e| format!("coordinator: node {}: {e}", k + 1))?;
            }
            Ok(sum)
        }
    }
}

/// What a node says when it joins.
struct Hello {
    rank: u32,
    count: u32,
    step: u64,
    run: String,
}

impl Hello {
    /// Why the coordinator (`self`) cannot train with `other`, if it cannot.
    fn mismatch(&self, other: &Hello) -> Option<String> {
        if other.count != self.count {
            Some(format!(
                "node {} was started for {} nodes, the coordinator for {}",
                other.rank, other.count, self.count
            ))
        } else if other.rank == 0 || other.rank >= self.count {
            Some(format!(
                "node rank {} is not one of 1..{}",
                other.rank, self.count
            ))
        } else if other.run != self.run {
            Some(format!(
                "node {} has another model, configuration or calibration set than the coordinator",
                other.rank
            ))
        } else if other.step != self.step {
            Some(format!(
                "node {} starts from update {}, the coordinator from {}: resume every node from the same checkpoint",
                other.rank, other.step, self.step
            ))
        } else {
            None
        }
    }

    fn write(&self, ch: &mut Channel) -> std::io::Result<()> {
        ch.w.write_all(MAGIC)?;
        ch.w.write_all(&self.rank.to_le_bytes())?;
        ch.w.write_all(&self.count.to_le_bytes())?;
        ch.w.write_all(&self.step.to_le_bytes())?;
        ch.write_bytes(self.run.as_bytes())
    }

    fn read(ch: &mut Channel) -> Result<Hello, String> {
        let mut magic = [0u8; 8];
        ch.r.read_exact(&mut magic).map_err(|e| e.to_string())?;
        if &magic != MAGIC {
            return Err("a connection that is not a maskprune node".into());
        }
        let rank = u32::from_le_bytes(ch.array().map_err(|e| e.to_string())?);
        let count = u32::from_le_bytes(ch.array().map_err(|e| e.to_string())?);
        let step = u64::from_le_bytes(ch.array().map_err(|e| e.to_string())?);
        let run = String::from_utf8_lossy(&ch.read_bytes().map_err(|e| e.to_string())?).into();
        Ok(Hello {
            rank,
            count,
            step,
            run,
        })
    }
}

/// One TCP connection, buffered both ways; values travel as little-endian f32.
struct Channel {
    r: BufReader<TcpStream>,
    w: BufWriter<TcpStream>,
}

impl Channel {
    fn new(stream: TcpStream) -> Result<Self, String> {
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        stream
            .set_read_timeout(Some(STEP_TIMEOUT))
            .map_err(|e| e.to_string())?;
        let r = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
        Ok(Channel {
            r,
            w: BufWriter::new(stream),
        })
    }

    fn array<const N: usize>(&mut self) -> std::io::Result<[u8; N]> {
        let mut b = [0u8; N];
        self.r.read_exact(&mut b)?;
        Ok(b)
    }

    fn write_bytes(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.w.write_all(&(b.len() as u64).to_le_bytes())?;
        self.w.write_all(b)?;
        self.w.flush()
    }

    fn read_bytes(&mut self) -> std::io::Result<Vec<u8>> {
        let n = u64::from_le_bytes(self.array()?) as usize;
        let mut b = vec![0u8; n];
        self.r.read_exact(&mut b)?;
        Ok(b)
    }

    /// The coordinator's answer to a hello: empty to accept, else why not.
    fn write_reply(&mut self, refusal: Option<&str>) -> Result<(), String> {
        self.write_bytes(refusal.unwrap_or("").as_bytes())
            .map_err(|e| e.to_string())
    }

    fn read_reply(&mut self) -> std::io::Result<Option<String>> {
        let b = self.read_bytes()?;
        Ok((!b.is_empty()).then(|| String::from_utf8_lossy(&b).into_owned()))
    }

    fn write_values(&mut self, v: &[f32]) -> std::io::Result<()> {
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.write_bytes(&bytes)
    }

    fn read_values(&mut self, n: usize) -> Result<Vec<f32>, String> {
        let b = self.read_bytes().map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => "closed the connection (stopped?)".to_string(),
            _ => e.to_string(),
        })?;
        if b.len() != n * 4 {
            return Err(format!("sent {} values, {n} expected", b.len() / 4));
        }
        Ok(b.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_port() -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    }

    fn node(rank: usize, count: usize, at: &str) -> Nodes {
        Nodes {
            count,
            rank,
            coordinator: at.to_string(),
        }
    }

    #[test]
    fn three_nodes_get_the_same_sum_added_in_node_order() {
        let at = free_port();
        let sums: Vec<Vec<f32>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..3)
                .map(|rank| {
                    let at = at.clone();
                    s.spawn(move || {
                        let mut link = node(rank, 3, &at).join("run", 5).unwrap();
                        let own = vec![rank as f32 + 1.0, 1e8, -(rank as f32)];
                        let first = link.sum(own.clone()).unwrap();
                        let second = link.sum(own).unwrap();
                        assert_eq!(first, second);
                        first
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let expected = vec![6.0, (1e8f32 + 1e8) + 1e8, -3.0];
        assert!(sums.iter().all(|s| *s == expected), "{sums:?}");
    }

    #[test]
    fn a_node_of_another_run_or_step_is_refused_in_one_line() {
        for (run, step, why) in [
            ("other", 5, "another model, configuration or calibration"),
            ("run", 7, "starts from update 7, the coordinator from 5"),
        ] {
            let at = free_port();
            let (coordinator, other) = std::thread::scope(|s| {
                let c = s.spawn(|| node(0, 2, &at).join("run", 5).map(|_| ()));
                let o = s.spawn(|| node(1, 2, &at).join(run, step).map(|_| ()));
                (c.join().unwrap(), o.join().unwrap())
            });
            let (c, o) = (coordinator.unwrap_err(), other.unwrap_err());
            assert!(c.contains(why) && o.contains(why), "{c} / {o}");
            assert!(!c.contains('\n') && !o.contains('\n'));
        }
    }

    #[test]
    fn a_node_that_stops_is_an_error_not_a_hang() {
        let at = free_port();
        let err = std::thread::scope(|s| {
            let c = s.spawn(|| {
                let mut link = node(0, 2, &at).join("run", 0).unwrap();
                link.sum(vec![1.0; 4])
            });
            s.spawn(|| drop(node(1, 2, &at).join("run", 0).unwrap()));
            c.join().unwrap()
        });
        assert!(err.unwrap_err().contains("node 1: closed the connection"));
    }

    #[test]
    fn a_rank_outside_the_nodes_is_refused() {
        assert!(node(2, 2, "x:1").check().is_err());
        assert!(node(1, 2, "").check().is_err());
        assert!(node(1, 2, "127.0.0.1:9").check().is_ok());
        assert!(Nodes::single().check().is_ok());
    }
}
