//! The client against `ballot dev`: start the cluster in one terminal
//! (`cargo run --release -p ballot -- dev`), then
//!
//! ```sh
//! cargo run --release -p ballot-client --example kv
//! ```

use ballot_client::{Client, Error};

#[tokio::main]
async fn main() -> Result<(), Error> {
    let store = Client::new([
        "http://127.0.0.1:8001",
        "http://127.0.0.1:8002",
        "http://127.0.0.1:8003",
    ]);
    let w = store.put("example/greeting", "hello").await?;
    println!("put: version {} (created: {})", w.version, w.created);

    if let Some(entry) = store.get("example/greeting").await? {
        println!(
            "get: {} at version {}",
            String::from_utf8_lossy(&entry.value),
            entry.version
        );
    }

    // A compare-and-swap at a stale version is refused with the state it
    // was refused against.
    match store.cas("example/greeting", w.version + 10, "nope").await {
        Err(Error::Refused { code, current, .. }) => {
            println!("cas refused ({code}); the key is at {current:?}")
        }
        other => println!("cas: {other:?}"),
    }

    // create is idempotent for one value: safe to retry after a timeout.
    let lock = store.create("example/lock", "owner-a").await?;
    let again = store.create("example/lock", "owner-a").await?;
    println!(
        "create: version {} (changed {}), again (changed {})",
        lock.version, lock.changed, again.changed
    );
    store.delete("example/lock").await?;
    Ok(())
}
