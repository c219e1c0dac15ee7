//! The sending half of an agent connection, written once for both ends: the agent
//! (tungstenite) and the controller (axum) each hand it their socket's sink, their
//! queues and how an item becomes a frame.
//!
//! Control messages (replies, acknowledgements, heartbeats: few, small and bounded by
//! the protocol) always go first; the two other queues (the controller's copy stream
//! and stream messages; the agent's log lines and stream messages) take turns, tokio's
//! `select!` picking among ready ones at random, so neither waits behind the other.
//! While more is queued, frames are fed without a flush and share a write. Every write
//! is bounded by `stall`: a silently dropped link stalls writes, and the connection is
//! declared dead instead of waiting for ever.

use std::time::Duration;

use futures_util::{Sink, SinkExt};
use tokio::sync::mpsc;

/// The next item to send, by the queue it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next<C, A, B> {
    Control(C),
    First(A),
    Second(B),
}

/// Why the write loop ended early.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("sending: {0}")]
    Send(String),
    #[error("sending stalled for {0:?}: connection declared dead")]
    Stalled(Duration),
}

/// The queues a write loop drains.
#[derive(Debug)]
pub struct Queues<C, A, B> {
    /// Sent first; the loop ends, closing the socket, when its senders are gone.
    pub control: mpsc::UnboundedReceiver<C>,
    pub first: mpsc::Receiver<A>,
    pub second: mpsc::Receiver<B>,
}

/// Sends what `queues` hold over `sink`, each item made a frame by `frame`, until the
/// control queue closes (then the socket is closed) or a write fails or stalls.
pub async fn write_loop<S, M, C, A, B>(
    mut sink: S,
    queues: Queues<C, A, B>,
    stall: Duration,
    mut frame: impl FnMut(Next<C, A, B>) -> M,
) -> Result<(), WriteError>
where
    S: Sink<M> + Unpin,
    S::Error: std::fmt::Display,
{
    let Queues { mut control, mut first, mut second } = queues;
    loop {
        let next = tokio::select! {
            biased;
            m = control.recv() => match m {
                Some(m) => Next::Control(m),
                None => break,
            },
            n = async {
                tokio::select! {
                    Some(a) = first.recv() => Next::First(a),
                    Some(b) = second.recv() => Next::Second(b),
                    else => std::future::pending().await,
                }
            } => n,
        };
        let more = !control.is_empty() || !first.is_empty() || !second.is_empty();
        let f = frame(next);
        let write = async { if more { sink.feed(f).await } else { sink.send(f).await } };
        match tokio::time::timeout(stall, write).await {
            Ok(r) => r.map_err(|e| WriteError::Send(e.to_string()))?,
            Err(_) => return Err(WriteError::Stalled(stall)),
        }
    }
    let _ = tokio::time::timeout(stall, sink.close()).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    type Frame = Next<u32, u32, u32>;
    type Senders = (mpsc::UnboundedSender<u32>, mpsc::Sender<u32>, mpsc::Sender<u32>);

    fn queues() -> (Senders, Queues<u32, u32, u32>) {
        let (c, control) = mpsc::unbounded_channel();
        let (a, first) = mpsc::channel(64);
        let (b, second) = mpsc::channel(64);
        ((c, a, b), Queues { control, first, second })
    }

    #[tokio::test]
    async fn control_goes_first_and_each_queue_keeps_its_order() {
        let ((c, a, b), q) = queues();
        for i in 0..10 {
            a.send(i).await.expect("queue");
            b.send(100 + i).await.expect("queue");
        }
        c.send(7).expect("queue");
        c.send(8).expect("queue");
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Frame>::new()));
        let record = seen.clone();
        let sink = futures_util::sink::unfold((), move |(), n: Frame| {
            record.lock().expect("lock").push(n);
            async { Ok::<_, std::convert::Infallible>(()) }
        });
        let task = tokio::spawn(write_loop(Box::pin(sink), q, Duration::from_secs(5), |n| n));
        while seen.lock().expect("lock").len() < 22 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The control queue closes: the loop ends, closing the socket.
        drop(c);
        task.await.expect("joined").expect("written");
        let sent = seen.lock().expect("lock").clone();
        assert_eq!(&sent[..2], &[Next::Control(7), Next::Control(8)], "{sent:?}");
        let firsts: Vec<u32> =
            sent.iter().filter_map(|n| if let Next::First(x) = n { Some(*x) } else { None }).collect();
        let seconds: Vec<u32> =
            sent.iter().filter_map(|n| if let Next::Second(x) = n { Some(*x) } else { None }).collect();
        assert_eq!(firsts, (0..10).collect::<Vec<_>>());
        assert_eq!(seconds, (100..110).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn neither_queue_waits_behind_the_other() {
        let ((c, a, b), q) = queues();
        let sink = futures_util::sink::unfold(Vec::new(), |mut seen: Vec<Frame>, n: Frame| async move {
            seen.push(n);
            Ok::<_, std::convert::Infallible>(seen)
        });
        let (tx, mut rx) = mpsc::unbounded_channel();
        let sink = sink.with(move |n: Frame| {
            let _ = tx.send(n.clone());
            async move { Ok::<_, std::convert::Infallible>(n) }
        });
        let task = tokio::spawn(write_loop(Box::pin(sink), q, Duration::from_secs(5), |n| n));
        for i in 0..50 {
            a.send(i).await.expect("queue");
        }
        b.send(1000).await.expect("queue");
        let mut before_second = 0;
        loop {
            match rx.recv().await.expect("frame") {
                Next::Second(_) => break,
                _ => before_second += 1,
            }
        }
        assert!(before_second < 50, "the second queue's item went out among the first's, not after all of them");
        drop(c);
        task.await.expect("joined").expect("written");
    }

    #[tokio::test]
    async fn a_stalled_link_is_declared_dead() {
        let ((c, _a, _b), q) = queues();
        c.send(1).expect("queue");
        let stuck = futures_util::sink::unfold((), |(), _n: Frame| async {
            std::future::pending::<()>().await;
            Ok::<_, std::convert::Infallible>(())
        });
        let r = write_loop(Box::pin(stuck), q, Duration::from_millis(100), |n| n).await;
        assert!(matches!(r, Err(WriteError::Stalled(_))), "{r:?}");
    }
}
