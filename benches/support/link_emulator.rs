//! [`LinkEmulator`]: a TCP proxy that makes a loopback connection behave
//! like a slow network link, for benchmarks (this kernel has no netem).
//!
//! Every byte pays a one-way delay of RTT/2 in each direction and shares
//! one bandwidth budget per direction with every other connection, as on a
//! real link; a new connection pays one RTT for its handshake. The proxy
//! counts bytes each way and HTTP requests (request lines end in
//! ` HTTP/1.1\r\n`; responses never do).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// Bandwidth in bits per second and round-trip time.
#[derive(Debug, Clone, Copy)]
pub struct LinkParams {
    pub bits_per_second: u64,
    pub rtt: Duration,
}

#[derive(Debug, Default)]
pub struct LinkCounters {
    /// Bytes from the server to the client.
    pub down_bytes: AtomicU64,
    pub up_bytes: AtomicU64,
    pub requests: AtomicU64,
    pub connections: AtomicU64,
}

impl LinkCounters {
    pub fn snapshot(&self) -> (u64, u64, u64) {
        (self.down_bytes.load(Ordering::Relaxed), self.up_bytes.load(Ordering::Relaxed), self.requests.load(Ordering::Relaxed))
    }
    pub fn reset(&self) {
        self.down_bytes.store(0, Ordering::Relaxed);
        self.up_bytes.store(0, Ordering::Relaxed);
        self.requests.store(0, Ordering::Relaxed);
        self.connections.store(0, Ordering::Relaxed);
    }
}

/// Serializes bytes onto a link of fixed bandwidth.
struct Pacer {
    bits_per_second: u64,
    next_free: Mutex<Instant>,
}

impl Pacer {
    /// Waits until `n` bytes that reached the link at `arrival` have gone
    /// through it. They go out when they arrive or when the link is free,
    /// whichever is later, whenever this thread gets to run: a proxy thread
    /// the scheduler wakes late (the client busy on both cores) delivers the
    /// backlog at once, as a real link fills the receiver's socket buffer
    /// meanwhile, instead of leaving the link idle.
    fn send(&self, n: usize, arrival: Instant) {
        if self.bits_per_second == 0 {
            return;
        }
        let cost = Duration::from_secs_f64(n as f64 * 8.0 / self.bits_per_second as f64);
        let done = {
            let mut next = self.next_free.lock().unwrap_or_else(|e| e.into_inner());
            let start = (*next).max(arrival);
            *next = start + cost;
            *next
        };
        let now = Instant::now();
        if done > now {
            thread::sleep(done - now);
        }
    }
}

pub struct LinkEmulator {
    pub addr: SocketAddr,
    pub counters: Arc<LinkCounters>,
    stop: Arc<AtomicBool>,
}

const REQUEST_END: &[u8] = b" HTTP/1.1\r\n";

impl LinkEmulator {
    /// Listens on 127.0.0.1 (a free port) and forwards to `upstream`.
    pub fn start(upstream: SocketAddr, params: LinkParams) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let counters = Arc::new(LinkCounters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let up = Arc::new(Pacer { bits_per_second: params.bits_per_second, next_free: Mutex::new(Instant::now()) });
        let down = Arc::new(Pacer { bits_per_second: params.bits_per_second, next_free: Mutex::new(Instant::now()) });
        let (c, s) = (counters.clone(), stop.clone());
        thread::spawn(move || {
            for client in listener.incoming() {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(client) = client else { continue };
                c.connections.fetch_add(1, Ordering::Relaxed);
                let (c, up, down) = (c.clone(), up.clone(), down.clone());
                thread::spawn(move || {
                    // The handshake costs a round trip before anything flows.
                    thread::sleep(params.rtt);
                    let Ok(server) = TcpStream::connect(upstream) else {
                        let _ = client.shutdown(Shutdown::Both);
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (Ok(client2), Ok(server2)) = (client.try_clone(), server.try_clone()) else { return };
                    let half = params.rtt / 2;
                    let c2 = c.clone();
                    let t = thread::spawn(move || pipe(client, server, half, up, &c2, true));
                    pipe(server2, client2, half, down, &c, false);
                    let _ = t.join();
                });
            }
        });
        Ok(LinkEmulator { addr, counters, stop })
    }
}

impl Drop for LinkEmulator {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(self.addr);
    }
}

/// Copies `from` to `to`, each piece released RTT/2 after it was read and
/// paced by the direction's bandwidth.
fn pipe(mut from: TcpStream, mut to: TcpStream, delay: Duration, pacer: Arc<Pacer>, counters: &LinkCounters, upstream: bool) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    let writer = thread::spawn(move || {
        for (due, data) in rx {
            let now = Instant::now();
            if due > now {
                thread::sleep(due - now);
            }
            pacer.send(data.len(), due);
            if to.write_all(&data).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
    let mut buf = vec![0u8; 16 << 10];
    let mut tail: Vec<u8> = Vec::new();
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if upstream {
            counters.up_bytes.fetch_add(n as u64, Ordering::Relaxed);
            // Count request lines, also when one straddles two reads.
            tail.extend_from_slice(&buf[..n]);
            let found = tail.windows(REQUEST_END.len()).filter(|w| *w == REQUEST_END).count();
            counters.requests.fetch_add(found as u64, Ordering::Relaxed);
            let keep = tail.len().min(REQUEST_END.len() - 1);
            tail.drain(..tail.len() - keep);
        } else {
            counters.down_bytes.fetch_add(n as u64, Ordering::Relaxed);
        }
        if tx.send((Instant::now() + delay, buf[..n].to_vec())).is_err() {
            break;
        }
    }
    drop(tx);
    let _ = writer.join();
}
