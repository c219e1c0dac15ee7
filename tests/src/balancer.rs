//! A TCP load balancer for tests with several controllers: each new connection goes to
//! the next backend in turn, or to the one after it when that one refuses (a
//! controller that was killed), as a TCP load balancer with health checks would.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Result;

/// Forwards connections until dropped.
#[derive(Debug)]
pub struct Balancer {
    pub addr: String,
    stop: Arc<AtomicBool>,
}

impl Balancer {
    pub fn start(listen: &str, backends: Vec<String>) -> Result<Balancer> {
        let listener = TcpListener::bind(listen)?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let next = AtomicUsize::new(0);
        let stopped = stop.clone();
        std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                let Ok((client, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                let first = next.fetch_add(1, Ordering::Relaxed);
                let backend = (0..backends.len()).find_map(|i| {
                    let addr = backends[(first + i) % backends.len()].parse().ok()?;
                    TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()
                });
                let Some(backend) = backend else { continue };
                let _ = client.set_nonblocking(false);
                splice(client, backend);
            }
        });
        Ok(Balancer { addr: listen.to_owned(), stop })
    }
}

/// Copies both ways; when either side ends, both do.
fn splice(a: TcpStream, b: TcpStream) {
    let pairs = [(a.try_clone(), b.try_clone()), (b.try_clone(), a.try_clone())];
    for (from, to) in pairs {
        let (Ok(mut from), Ok(mut to)) = (from, to) else { continue };
        std::thread::spawn(move || {
            let mut buf = [0u8; 64 << 10];
            loop {
                match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = to.shutdown(Shutdown::Both);
            let _ = from.shutdown(Shutdown::Both);
        });
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
