//! Wake-ups across the processes on one database. After it commits a change, a process
//! announces it with `NOTIFY` on one channel; every process listens on that channel and
//! wakes its change streams, so a change committed through one replica reaches the
//! proxies following another at once instead of at their next poll (`http/sync.rs`
//! still polls, in case a notification is lost while a listener reconnects).
//!
//! Announcements are coalesced: one `NOTIFY` at a time, outside the committing
//! transaction (a `NOTIFY` inside it would serialise every commit on PostgreSQL's queue
//! lock), the next covering every commit made meanwhile. The payload names the process,
//! which ignores its own.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::watch;

use crate::store::StoreResult;

/// The channel every process announces its commits on.
const CHANNEL: &str = "quotastack_commits";
/// How long a listener that failed waits before it listens again.
const RETRY: Duration = Duration::from_secs(1);

/// This process's side of the channel: announce its commits, hear the others'.
#[derive(Debug, Clone)]
pub(super) struct Commits {
    announce: Arc<watch::Sender<u64>>,
    heard: watch::Receiver<u64>,
}

impl Commits {
    /// Listens on the channel and starts the announcer, each a task of its own; both end
    /// once every handle on them is dropped.
    ///
    /// # Errors
    /// The listener cannot connect or listen.
    pub(super) async fn start(pool: &PgPool) -> StoreResult<Commits> {
        let instance = format!("{:016x}", rand::random::<u64>());
        let mut listener = PgListener::connect_with(pool).await?;
        listener.listen(CHANNEL).await?;
        let (heard_sender, heard) = watch::channel(0_u64);
        let (announce, announced) = watch::channel(0_u64);
        tokio::spawn(listen(listener, instance.clone(), heard_sender));
        tokio::spawn(announcer(pool.clone(), instance, announced));
        Ok(Commits {
            announce: Arc::new(announce),
            heard,
        })
    }

    /// Announces that this process committed a change.
    pub(super) fn announce(&self) {
        self.announce
            .send_modify(|count| *count = count.wrapping_add(1));
    }

    /// A receiver that sees a new value whenever another process announced a commit.
    pub(super) fn heard(&self) -> watch::Receiver<u64> {
        self.heard.clone()
    }
}

fn bump(count: &mut u64) {
    *count = count.wrapping_add(1);
}

/// Hears the other processes' announcements until no one holds a receiver. A lost
/// connection may have lost notifications, so it counts as one heard.
async fn listen(mut listener: PgListener, instance: String, heard: watch::Sender<u64>) {
    loop {
        tokio::select! {
            received = listener.try_recv() => match received {
                Ok(Some(notification)) => {
                    if notification.payload() != instance {
                        heard.send_modify(bump);
                    }
                }
                // The connection was lost; the next call reconnects and listens again.
                Ok(None) => heard.send_modify(bump),
                Err(error) => {
                    tracing::warn!(%error, "listening for other replicas' commits failed; streams poll meanwhile");
                    tokio::time::sleep(RETRY).await;
                }
            },
            () = heard.closed() => return,
        }
    }
}

/// Sends one `NOTIFY` per burst of announcements, until the store is dropped.
async fn announcer(pool: PgPool, instance: String, mut announced: watch::Receiver<u64>) {
    // `changed` marks what it saw as seen: announcements made while a NOTIFY is sent are
    // covered by the next one.
    while announced.changed().await.is_ok() {
        let sent = bind!(sqlx::query("SELECT pg_notify($1, $2)"); CHANNEL, &instance)
            .execute(&pool)
            .await;
        if let Err(error) = sent {
            tracing::warn!(%error, "announcing a commit to other replicas failed; they find it by polling");
        }
    }
}
