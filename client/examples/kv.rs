//! The client against `ballot dev`: start the cluster in one terminal
//! (`cargo run --release -p ballot -- dev`), then
//!
//! ```sh
//! cargo run --release -p ballot-client --example kv
//! ```

use ballot_client::http::Tls;
use ballot_client::{Client, Error};

#[tokio::main]
async fn main() -> Result<(), Error> {
    // The replicas serve HTTPS with a certificate from the cluster's CA,
    // which `ballot dev` keeps in `ballot-dev/certs/ca.pem`.
    let dir = std::env::var("BALLOT_DEV_DIR").unwrap_or_else(|_| "ballot-dev".into());
    let ca = std::path::Path::new(&dir).join("certs/ca.pem");
    let tls = Tls::from_files(&ca, None).unwrap_or_else(|e| {
        eprintln!("{e} (is `ballot dev` running here?)");
        std::process::exit(1)
    });
    let store = Client::new([
        "https://127.0.0.1:8001",
        "https://127.0.0.1:8002",
        "https://127.0.0.1:8003",
    ])
    .with_tls(&tls);
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
