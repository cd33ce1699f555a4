//! `ballot dev`: a local cluster of real replica processes, supervised until
//! Ctrl-C, and the commands that stop, start and restart its replicas from
//! another terminal. With `--wan FILE` the replicas reach each other
//! through the link emulator (`crate::wan`) laid out as the topology file
//! says, and `ballot dev isolate N` / `heal` cut and mend links.
//!
//! A replica that exits is reported and left down (or started again after
//! a second with `--restart`); the others keep serving. The running
//! `ballot dev` listens on `DIR/dev.sock` for one-line commands
//! (`stop N`, `start N`, `restart N`, `isolate N`, `heal`), which `ballot dev stop N` and the
//! like send; `cluster.json` says which replicas run, with their pids.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::cli::output::{fail, init_logging, LogFormat};
use crate::dev::DevCluster;
use crate::server::CoreKind;

/// Reports on stderr. A closed stderr (`2>&1 | head`) is no reason to
/// stop supervising the cluster, so write errors are ignored.
macro_rules! report {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// Longest a replica gets to stop on SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Longest a control command line.
const COMMAND_MAX: usize = 64;

#[derive(Args, Debug)]
pub struct DevArgs {
    /// Number of replicas.
    #[arg(long, default_value_t = 3, conflicts_with = "wan")]
    nodes: u32,
    /// Run the replicas as if in the regions of this topology file
    /// (`examples/wan/3-regions.toml`): one replica per region unless the
    /// file says more, each link with the file's round trip, jitter and
    /// loss, through relays in front of the peer ports.
    #[arg(long)]
    wan: Option<PathBuf>,
    /// Cluster directory (certificates, configurations, data, logs).
    #[arg(long, default_value = "ballot-dev", global = true)]
    dir: PathBuf,
    /// First replica's HTTP port; the others follow. 0 picks free ports.
    #[arg(long, default_value_t = 8001)]
    http_port: u16,
    /// First replica's QUIC port; the others follow. 0 picks free ports.
    #[arg(long, default_value_t = 7001)]
    peer_port: u16,
    /// Run the protocol as the embedded wasm component or compiled in.
    #[arg(long, value_enum, default_value = "wasm")]
    core: CoreKind,
    /// Start a replica that exits again after a second (default: report
    /// it and leave it down).
    #[arg(long)]
    restart: bool,
    #[command(subcommand)]
    action: Option<DevAction>,
}

/// What to do to a replica of the `ballot dev` running on `--dir`.
#[derive(Subcommand, Debug, Clone, Copy)]
enum DevAction {
    /// Stop replica N (SIGTERM, then SIGKILL after 5 s); it stays down.
    Stop { id: u32 },
    /// Start replica N again on its data.
    Start { id: u32 },
    /// Stop replica N, then start it again.
    Restart { id: u32 },
    /// Cut replica N off from every other, both ways (`--wan` only).
    Isolate { id: u32 },
    /// Mend every link cut (`--wan` only); delays stay as the file says.
    Heal,
}

impl DevAction {
    fn id(self) -> Option<u32> {
        match self {
            DevAction::Stop { id }
            | DevAction::Start { id }
            | DevAction::Restart { id }
            | DevAction::Isolate { id } => Some(id),
            DevAction::Heal => None,
        }
    }

    fn line(self) -> String {
        match self {
            DevAction::Stop { id } => format!("stop {id}"),
            DevAction::Start { id } => format!("start {id}"),
            DevAction::Restart { id } => format!("restart {id}"),
            DevAction::Isolate { id } => format!("isolate {id}"),
            DevAction::Heal => "heal".into(),
        }
    }

    fn parse(line: &str) -> Result<DevAction, String> {
        let mut words = line.split_whitespace();
        let (verb, id) = (words.next(), words.next().and_then(|w| w.parse().ok()));
        match (verb, id, words.next()) {
            (Some("stop"), Some(id), None) => Ok(DevAction::Stop { id }),
            (Some("start"), Some(id), None) => Ok(DevAction::Start { id }),
            (Some("restart"), Some(id), None) => Ok(DevAction::Restart { id }),
            (Some("isolate"), Some(id), None) => Ok(DevAction::Isolate { id }),
            (Some("heal"), None, None) => Ok(DevAction::Heal),
            _ => Err(format!(
                "not a command: {line:?} (stop N, start N, restart N, isolate N or heal)"
            )),
        }
    }
}

fn socket_path(dir: &Path) -> PathBuf {
    dir.join("dev.sock")
}

pub fn dev(args: DevArgs) -> ExitCode {
    // The relays of --wan run beside the supervisor, which may block a
    // thread for seconds while it stops a replica: they need threads of
    // their own.
    let rt = match args.wan {
        Some(_) => tokio::runtime::Builder::new_multi_thread(),
        None => tokio::runtime::Builder::new_current_thread(),
    }
    .enable_all()
    .build();
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => return fail(format!("starting tokio: {e}")),
    };
    if let Some(action) = args.action {
        return rt.block_on(control(&args.dir, action));
    }
    init_logging(LogFormat::Human);
    let binary = match std::env::current_exe() {
        Ok(b) => b,
        Err(e) => return fail(format!("locating the ballot binary: {e}")),
    };
    let topology = match &args.wan {
        Some(path) => match crate::wan::Topology::load(path) {
            Ok(t) => Some(t),
            Err(e) => return fail(e),
        },
        None => None,
    };
    let nodes = topology.as_ref().map_or(args.nodes, |t| t.nodes());
    let mut cluster = match DevCluster::prepare(
        &args.dir,
        nodes,
        args.peer_port,
        args.http_port,
        args.core,
        binary,
    ) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let wan = match topology {
        Some(topology) => match rt.block_on(crate::wan::Fabric::start(&cluster.peer_addrs())) {
            Ok(fabric) => {
                fabric.apply(&topology);
                let routed = cluster
                    .route_peers(|id| fabric.front(id))
                    .and_then(|()| cluster.fit_timeouts(&topology));
                if let Err(e) = routed {
                    return fail(e);
                }
                Some(Wan { topology, fabric })
            }
            Err(e) => return fail(format!("starting the link emulator: {e}")),
        },
        None => None,
    };
    let code = rt.block_on(supervise(&mut cluster, wan.as_ref(), args.restart));
    report!("stopping the cluster");
    cluster.stop_all();
    let _ = std::fs::remove_file(cluster.dir.join("cluster.json"));
    let _ = std::fs::remove_file(socket_path(&cluster.dir));
    code
}

/// Sends one command to the running `ballot dev` and prints its answer.
async fn control(dir: &Path, action: DevAction) -> ExitCode {
    let path = socket_path(dir);
    let stream = match UnixStream::connect(&path).await {
        Ok(s) => s,
        Err(e) => {
            return fail(format!(
                "no ballot dev runs on {} ({}: {e})",
                dir.display(),
                path.display()
            ))
        }
    };
    let (read, mut write) = stream.into_split();
    if let Err(e) = write
        .write_all(format!("{}\n", action.line()).as_bytes())
        .await
    {
        return fail(format!("sending to ballot dev: {e}"));
    }
    let mut answer = String::new();
    let read = tokio::time::timeout(
        2 * STOP_GRACE + Duration::from_secs(60),
        BufReader::new(read).read_line(&mut answer),
    )
    .await;
    match read {
        Ok(Ok(_)) if answer.starts_with("ok") => {
            println!("{}", answer.trim_end().trim_start_matches("ok: "));
            ExitCode::SUCCESS
        }
        Ok(Ok(_)) => fail(answer.trim_end().trim_start_matches("error: ")),
        Ok(Err(e)) => fail(format!("reading ballot dev's answer: {e}")),
        Err(_) => fail("ballot dev did not answer"),
    }
}

/// The emulated links of a `--wan` cluster.
struct Wan {
    topology: crate::wan::Topology,
    fabric: crate::wan::Fabric,
}

async fn supervise(cluster: &mut DevCluster, wan: Option<&Wan>, restart: bool) -> ExitCode {
    if let Err(e) = cluster.start_all() {
        return fail(e);
    }
    if let Err(e) = cluster.wait_all_ready(Duration::from_secs(60)).await {
        return fail(e);
    }
    // Written, not printed: a reader that stops reading (`| head`, a test
    // that has seen enough) must not take the cluster down with a panic on
    // a broken pipe.
    let mut out = std::io::stdout();
    for node in &cluster.nodes {
        let region = wan
            .and_then(|w| {
                w.topology
                    .region_of(node.id)
                    .map(|r| &w.topology.regions[r].name)
            })
            .map(|r| format!(" ({r})"))
            .unwrap_or_default();
        let _ = writeln!(out, "node {}{region}: {}", node.id, node.http());
    }
    if wan.is_some() {
        let _ = writeln!(
            out,
            "links: as the topology file says, through relays in this process; \
             `ballot dev isolate N` cuts replica N off, `ballot dev heal` mends every link"
        );
    }
    let manifest = match cluster.write_manifest() {
        Ok(path) => path,
        Err(e) => return fail(e),
    };
    let socket = socket_path(&cluster.dir);
    let _ = std::fs::remove_file(&socket);
    let listener = match UnixListener::bind(&socket) {
        Ok(l) => l,
        Err(e) => return fail(format!("listening on {}: {e}", socket.display())),
    };
    let _ = writeln!(
        out,
        "CA: {} (the replicas serve HTTPS; the CLI trusts this CA when run beside it, curl needs --cacert)",
        crate::tls::ca_cert_path(&cluster.dir.join("certs")).display()
    );
    let _ = writeln!(
        out,
        "admin token: {} (the CLI reads it when run beside it; elsewhere set BALLOT_DEV_DIR or BALLOT_ADMIN_TOKEN)",
        cluster.dir.join(crate::dev::ADMIN_TOKEN_FILE).display()
    );
    let _ = writeln!(
        out,
        "cluster: {} (logs beside it); Ctrl-C stops it, `ballot dev stop|start|restart N` plays with one replica",
        manifest.display()
    );
    let _ = out.flush();
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(t) => t,
        Err(e) => return fail(format!("installing a signal handler: {e}")),
    };
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    // Replicas that exited on their own, and when to start them again.
    let mut due: Vec<(u32, tokio::time::Instant)> = Vec::new();
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return ExitCode::SUCCESS,
            _ = term.recv() => return ExitCode::SUCCESS,
            conn = listener.accept() => {
                if let Ok((stream, _)) = conn {
                    serve_command(cluster, wan, stream, &mut due).await;
                }
            }
            _ = tick.tick() => {
                let mut changed = false;
                while let Some((id, status)) = cluster.exited() {
                    changed = true;
                    let log = cluster.log_path(id);
                    if restart {
                        report!("replica {id} exited ({status}); starting it again in 1 s (log: {})", log.display());
                        due.push((id, tokio::time::Instant::now() + Duration::from_secs(1)));
                    } else {
                        report!(
                            "replica {id} exited ({status}); the others keep serving. \
                             `ballot dev start {id}` brings it back (log: {})",
                            log.display()
                        );
                    }
                }
                let now = tokio::time::Instant::now();
                for (id, _) in due.iter().filter(|(_, at)| *at <= now) {
                    changed = true;
                    match cluster.start(*id) {
                        Ok(()) => report!("replica {id} started again"),
                        Err(e) => report!("replica {id} did not start: {e}"),
                    }
                }
                due.retain(|(_, at)| *at > now);
                if changed {
                    let _ = cluster.write_manifest();
                }
            }
        }
    }
}

/// Reads one command from `stream`, carries it out and answers.
async fn serve_command(
    cluster: &mut DevCluster,
    wan: Option<&Wan>,
    stream: UnixStream,
    due: &mut Vec<(u32, tokio::time::Instant)>,
) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(COMMAND_MAX as u64));
    let read = tokio::time::timeout(Duration::from_secs(2), reader.read_line(&mut line)).await;
    let answer = match read {
        Ok(Ok(_)) => match DevAction::parse(&line) {
            Ok(action) => act(cluster, wan, action, due).await,
            Err(e) => Err(e),
        },
        _ => Err("no command within 2 s".to_string()),
    };
    // cluster.json is true by the time the command's sender hears back.
    if let Err(e) = cluster.write_manifest() {
        report!("{e}");
    }
    let text = match answer {
        Ok(done) => {
            report!("{done}");
            format!("ok: {done}\n")
        }
        Err(e) => format!("error: {e}\n"),
    };
    let _ = write.write_all(text.as_bytes()).await;
}

async fn act(
    cluster: &mut DevCluster,
    wan: Option<&Wan>,
    action: DevAction,
    due: &mut Vec<(u32, tokio::time::Instant)>,
) -> Result<String, String> {
    if matches!(action, DevAction::Isolate { .. } | DevAction::Heal) && wan.is_none() {
        return Err("links can be cut only in a cluster started with --wan".into());
    }
    let Some(id) = action.id() else {
        if let Some(wan) = wan {
            wan.fabric.heal();
        }
        return Ok("every link is up".into());
    };
    if !cluster.contains(id) {
        return Err(format!("this cluster has no replica {id}"));
    }
    if let (DevAction::Isolate { .. }, Some(wan)) = (action, wan) {
        wan.fabric.isolate(id);
        return Ok(format!("replica {id} is cut off from every other"));
    }
    // A command overrides a pending automatic restart.
    due.retain(|(d, _)| *d != id);
    match action {
        DevAction::Stop { .. } if !cluster.running(id) => {
            Err(format!("replica {id} is not running"))
        }
        DevAction::Stop { .. } => {
            cluster.stop(id, STOP_GRACE);
            Ok(format!("replica {id} stopped"))
        }
        DevAction::Start { .. } if cluster.running(id) => {
            Err(format!("replica {id} is already running"))
        }
        DevAction::Isolate { .. } | DevAction::Heal => unreachable!("answered above"),
        DevAction::Start { .. } | DevAction::Restart { .. } => {
            cluster.stop(id, STOP_GRACE);
            cluster.start(id)?;
            cluster.wait_alive(id, Duration::from_secs(60)).await?;
            Ok(format!("replica {id} started"))
        }
    }
}
