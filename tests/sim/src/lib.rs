//! A deterministic simulator for Ballot's protocol.
//!
//! One thread, one seed: n replicas run the real protocol logic (the native
//! build of `ballot-core`, or the default wasm component in wasmtime) over a
//! simulated network that drops, duplicates, delays, reorders and partitions
//! messages (both ways or one way), a simulated disk whose unpersisted
//! writes are lost when a replica crashes, and a clock per replica that is
//! skewed and jumps. Faults go on for the whole run; single replicas and
//! whole clusters crash and restart. Clients issue every register operation
//! on a few hot keys. Each run records the client history and checks it for
//! linearizability per key; checks that no two replicas ever commit or
//! announce different values for the same key and version, and that no
//! classic ballot ever carries two proposals; and bounds how long an
//! operation may wait. The same seed always replays the same run.

mod activation;
pub mod check;
mod leases;
mod records;
mod replay;

use activation::{Following, Operator, SysCall};
pub use activation::{EMBEDDED, NEXT};
use replay::Log;
pub use replay::QUIET_MS;

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use ballot_core::register::Command;
use ballot_core::wire::{Ballot, Msg, ProposalId};
use ballot_core::{
    register, Actions, Batch, Change as PolicyChange, Config, Consistency, Core, Current, Env,
    Inbound, KeyState, Members, Operation, Outcome, Rejection, Replica, ReplicaId, Request, Timer,
    Write,
};

use ballot_control::members::{self, MembersRecord, Role};
use ballot_control::pipeline::{Pipeline, Step};
use ballot_control::stages::{self, Task};
use check::{Input, Output};

/// A deliberately broken protocol, to show the checker catches it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Planted {
    /// Epoxy's fast path: per-proposer ballots (1, id) skipping prepare.
    EpoxyFastPath,
    /// Votes (promises, acceptances) announced before they are durable.
    EarlyVotes,
    /// Review defect A: learners reuse their classic ballots.
    BallotReuse,
    /// Review defect C: query ids restart in every incarnation.
    QueryIdReuse,
    /// Review defect B: a command whose proposal went out is evaluated
    /// again (caught with deadline commands, [`SimConfig::deadlines`]).
    Reevaluation,
    /// A key's leader that lost its promise moves to a higher ballot and
    /// skips phase 1.
    LeaderSkipsPrepare,
    /// The commands of a batch go back to the queue while its proposal
    /// may still be chosen.
    BatchRequeueExposed,
    /// A step that voted and learned on a key is held in memory like a
    /// lone decision: its vote is announced and never written.
    LazyVotes,
}

/// First byte of a command with a deadline: `[0xD1, deadline_ms u64 BE,
/// register command]`. Register commands start with their format byte, 1.
pub const DEADLINE_TAG: u8 = 0xD1;

/// Wraps a register command in a deadline.
pub fn with_deadline(deadline_ms: u64, command: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + command.len());
    out.push(DEADLINE_TAG);
    out.extend_from_slice(&deadline_ms.to_be_bytes());
    out.extend_from_slice(command);
    out
}

/// The deadline, if any, and the register command inside.
pub fn split_deadline(command: &[u8]) -> (Option<u64>, &[u8]) {
    match command {
        [DEADLINE_TAG, rest @ ..] if rest.len() >= 8 => {
            let (at, inner) = rest.split_at(8);
            (
                Some(u64::from_be_bytes(at.try_into().expect("8 bytes"))),
                inner,
            )
        }
        _ => (None, command),
    }
}

/// The native policy host: the register policy, and a clock-dependent one
/// for commands with a deadline, which it refuses (`expired`) once the
/// replica's clock has passed the deadline, as a lease renewal is refused
/// after the lease ran out. Two evaluations of one such command at different
/// times can disagree, which is what the exposure rule (design section 3)
/// must survive.
#[derive(Clone, Copy, Debug, Default)]
pub struct SimEnv;

impl Env for SimEnv {
    fn apply(
        &mut self,
        _key: &[u8],
        current: &Current,
        command: &[u8],
        now_ms: u64,
    ) -> Result<PolicyChange, Rejection> {
        match split_deadline(command) {
            (Some(deadline), _) if now_ms > deadline => Err(Rejection {
                code: "expired".to_string(),
                message: format!("the deadline {deadline} ms passed at {now_ms} ms"),
            }),
            (_, inner) => register::apply(current, inner),
        }
    }
}

/// One run's workload and faults. Which core runs, and whether a bug is
/// planted, is the [`CoreFactory`]'s choice.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub seed: u64,
    pub nodes: usize,
    /// Loss, duplication, delay and reordering, partitions, crash-restarts.
    pub faults: bool,
    pub clients: usize,
    pub ops_per_client: usize,
    pub keys: usize,
    /// Membership changes during the run: two spare replicas join and two
    /// of the original ones leave, in an order drawn from the seed, each
    /// change through the same stages as `ballot cluster add|remove`, the
    /// membership record read and written through the replicas' cores by
    /// two racing drivers (`simulator::records`).
    pub reconfigure: bool,
    /// A share of the commands carry a deadline and run the clock-dependent
    /// policy of [`SimEnv`] (where the factory's cores run it: the
    /// components run the register policy, and ignore this).
    pub deadlines: bool,
    /// Once per run a crash may flip one bit of one checksummed record the
    /// replica had made durable, which it must then refuse to act on.
    pub corrupt: bool,
    /// Corrupt records of formats 1 and 3 too, which carry no checksum: a replica
    /// then acts on bits that changed under it. Unsafe, kept so a test can
    /// show that the corruption fault bites (run it with the components,
    /// which write format 3).
    pub unchecked_corruption: bool,
    /// Change voters without the classic-only epoch and the sweep (every
    /// other stage and wait kept): unsafe, kept so a test can show that the
    /// checker catches it.
    pub unsafe_membership: bool,
    /// Once per run a crash may lose the replica's whole data directory: it
    /// comes back empty, with a new directory identity and a new
    /// incarnation, as `ballot serve` does on an empty directory. Peers
    /// that recorded its old identity drop what it sends (design section 7,
    /// "Identity"), as the daemon's transport refuses its streams.
    pub wipe: bool,
    /// Peers accept a lost directory's messages (review defect E): unsafe,
    /// kept so a test can show that the wipe fault bites.
    pub unchecked_identity: bool,
    /// A membership epoch a replica adopts is kept in memory only, and a
    /// restart resumes the start-up membership, as the daemon did before an
    /// adopted record reached LMDB ahead of the core (review defect D):
    /// unsafe, kept so a test can show that restarts reach it.
    pub volatile_epoch: bool,
    /// The ready pipeline releases a ready that writes nothing at once,
    /// with every ready before it, durable or not: unsafe, kept so a test
    /// can show that the checker catches a pipeline that releases early.
    pub jumping_pipeline: bool,
    /// Protocol activations during the run (`simulator::activation`): the
    /// configuration record and the readiness answers go through
    /// consensus, and replicas swap their protocol instance live.
    pub activations: bool,
    /// Activations go ahead once a majority of the members is ready:
    /// unsafe, kept so a test can show that the check catches it.
    pub planted_quorum_readiness: bool,
    /// Changelog replay, truncation and snapshots (`simulator::replay`),
    /// and, once the clients are done, a quiet time after which every
    /// member that is up must hold the newest commit of every key.
    pub replay: bool,
    /// Changelog entries a replica keeps beyond what its peers replayed.
    pub changelog_keep: u64,
    /// A replica behind a peer's truncation skips to what the peer still
    /// holds instead of replaying its snapshot: unsafe, kept so a test can
    /// show that the convergence check catches it.
    pub planted_replay_skips_snapshot: bool,
    /// Replicas never replay: unsafe, kept so a test can show how much the
    /// convergence check depends on the replay.
    pub planted_no_replay: bool,
    /// With `reconfigure`: the drivers publish the membership record with a
    /// plain write, not a compare-and-swap: unsafe, kept so a test can show
    /// that racing drivers then break the membership.
    pub planted_blind_publish: bool,
    /// With `reconfigure`: a sweeping voter reads only the keys it holds
    /// state for itself, as the daemon did before: unsafe, kept so a test
    /// can show that a value chosen two voter changes back then ends up
    /// outside a quorum of the new voters.
    pub planted_sweep_own_keys: bool,
    /// Lock holders with leases, and a lease reaper on every replica
    /// (`simulator::leases`).
    pub leases: bool,
    /// With `leases`: the reapers time leases on the replicas' wall
    /// clocks, which jump: unsafe, kept so a test can show that the lock
    /// check catches it.
    pub planted_wall_clock_reaper: bool,
    /// Every 100–300 ms, check what a listing (`GET /v1/kv`) through each
    /// replica that is up rests on: every key a client write was
    /// acknowledged for is held (has protocol state, durably) by enough
    /// voters of the replica's epoch that no classic quorum of the voters
    /// that could answer it lacks the key.
    pub listing: bool,
    /// Crashes in the middle of writes ten times as often: a fifth of the
    /// writes stall (not 2 %), half of the stalls end in a crash (not a
    /// quarter), up to 30 a run (not 3). The window between a ready's
    /// early effects and its durability is what the early-effects rule
    /// (`split_actions`) is about; off by default, so that the other runs'
    /// seeds keep their schedules.
    pub fsync_crashes: bool,
}

impl SimConfig {
    pub fn new(seed: u64, nodes: usize) -> Self {
        SimConfig {
            seed,
            nodes,
            faults: true,
            clients: 2 * nodes,
            ops_per_client: 12,
            keys: 2,
            reconfigure: false,
            deadlines: true,
            corrupt: true,
            unchecked_corruption: false,
            unsafe_membership: false,
            wipe: true,
            unchecked_identity: false,
            volatile_epoch: false,
            jumping_pipeline: false,
            activations: false,
            planted_quorum_readiness: false,
            replay: false,
            changelog_keep: 8,
            planted_replay_skips_snapshot: false,
            planted_no_replay: false,
            planted_blind_publish: false,
            planted_sweep_own_keys: false,
            leases: false,
            planted_wall_clock_reaper: false,
            listing: false,
            fsync_crashes: false,
        }
    }

    /// A run with membership changes under load and faults.
    pub fn reconfiguring(seed: u64, nodes: usize) -> Self {
        SimConfig {
            ops_per_client: 30,
            reconfigure: true,
            ..SimConfig::new(seed, nodes)
        }
    }
}

/// A replica's ready pipeline, with the planted bug if the run asks.
fn pipeline(cfg: &SimConfig) -> Pipeline {
    let watched = if cfg.activations {
        vec![b"\0ballot/config".to_vec()]
    } else {
        Vec::new()
    };
    let mut p = Pipeline::new(watched);
    if cfg.jumping_pipeline {
        p.plant_empty_ready_jumps_the_queue();
    }
    p
}

/// Replicas that are not members at the start of a reconfiguring run.
pub const SPARES: usize = 2;

/// One client operation, as recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub client: usize,
    pub node: ReplicaId,
    pub key: Vec<u8>,
    pub op: Operation,
    pub call: u64,
    pub ret: Option<u64>,
    /// Simulated time of the call, in ms.
    pub call_ms: u64,
    /// `None` when the replica crashed before answering.
    pub outcome: Option<Outcome>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub steps: u64,
    pub messages: u64,
    /// Leader mode: phase-2-only requests sent, commands forwarded to a
    /// key's leader (copies sent), and replies to forwarded commands.
    pub continues: u64,
    pub forwards: u64,
    pub forward_replies: u64,
    /// Accept and Continue messages whose proposal carries a batch (more
    /// than one version).
    pub batched: u64,
    pub dropped: u64,
    pub crashes: u64,
    pub ops_done: u64,
    pub ops_failed: u64,
    pub ops_unknown: u64,
    pub virtual_ms: u64,
    /// Membership changes completed, and the last epoch published.
    pub changes: u64,
    pub epoch: u64,
    /// Partitions (both ways and one way), clock jumps and crashes of the
    /// whole cluster injected.
    pub partitions: u64,
    pub clock_jumps: u64,
    pub cluster_crashes: u64,
    /// Records corrupted on disk.
    pub corruptions: u64,
    /// Crashes injected as the membership driver moved to a new stage.
    pub stage_crashes: u64,
    /// Data directories lost at a crash, and messages peers dropped because
    /// their sender presented another directory than the one on record.
    pub wipes: u64,
    pub refused: u64,
    /// New directories their peers refused to admit.
    pub refused_admissions: u64,
    /// Replicas removed while they were down, which came back on the epoch
    /// they had.
    pub removed_down: u64,
    /// Restarts on an older epoch than the newest published.
    pub lagging_restarts: u64,
    /// The longest any client operation waited for its answer, in ms.
    pub wait_max_ms: u64,
    /// Activations started, and how they ended: gone ahead, refused (by
    /// a replica, or because another was being checked), failed (no
    /// quorum, lost races), lost (the replica asked crashed), or nothing to
    /// do (the target was active already).
    pub activations: u64,
    pub activations_gone: u64,
    pub activations_refused: u64,
    pub activations_failed: u64,
    pub activations_lost: u64,
    pub activations_noop: u64,
    /// Live swaps begun and done, and those whose drain deadline passed
    /// with requests or readies in flight.
    pub swaps_started: u64,
    pub swaps: u64,
    pub drain_timeouts: u64,
    /// Client operations a swap's drain deadline abandoned.
    pub abandoned: u64,
    /// Snapshots replayed, changelog truncations, and keys read because a
    /// peer's changelog or snapshot held a newer commit.
    pub snapshots: u64,
    pub truncations: u64,
    pub replay_reads: u64,
    /// Lock acquisitions and lease expiries (with leases).
    pub lock_acquired: u64,
    pub lease_expiries: u64,
    /// Holders that gave up waiting because the lock key could not be read
    /// for a minute, or a corrupted record kept its lease from ending.
    pub lock_gave_up: u64,
    /// Runs whose convergence was not checked (a record was corrupted).
    pub convergence_unchecked: u64,
}

/// Longest a client operation may wait for its answer (simulated time)
/// before the run fails for liveness.
pub const WAIT_MAX_MS: u64 = 120_000;

#[derive(Clone, Debug)]
pub struct Report {
    pub history: Vec<Record>,
    pub violations: Vec<String>,
    pub stats: Stats,
}

/// Creates protocol cores for replicas.
pub trait CoreFactory {
    fn make(&self, config: Config) -> Box<dyn Core>;
    /// A core running protocol `label` ([`EMBEDDED`] or [`NEXT`]), for runs
    /// with activations. A factory with one build makes the same core: the
    /// swap still replaces the instance.
    fn make_running(&self, config: Config, _label: &str) -> Box<dyn Core> {
        self.make(config)
    }
    /// The cores run [`SimEnv`], so commands may carry deadlines.
    fn runs_sim_env(&self) -> bool {
        false
    }
}

/// The native build of `ballot-core`, optionally with a planted bug. It
/// writes key-state format 4, whose records carry a checksum, so a record
/// the simulator corrupts on disk is caught (format 3 has none: the
/// component's runs never corrupt).
pub struct NativeFactory(pub Option<Planted>);

impl CoreFactory for NativeFactory {
    fn make(&self, config: Config) -> Box<dyn Core> {
        let mut replica = Replica::new(config, SimEnv).expect("valid sim config");
        replica
            .write_state_format(ballot_core::wire::STATE_FORMAT_CHECKED)
            .expect("the checked format is readable and writable");
        match self.0 {
            Some(Planted::EpoxyFastPath) => replica.plant_epoxy_fast_path(),
            Some(Planted::EarlyVotes) => replica.plant_early_votes(),
            Some(Planted::BallotReuse) => replica.plant_ballot_reuse(),
            Some(Planted::QueryIdReuse) => replica.plant_query_id_reuse(),
            Some(Planted::Reevaluation) => replica.plant_reevaluation(),
            Some(Planted::LeaderSkipsPrepare) => replica.plant_leader_skips_prepare(),
            Some(Planted::BatchRequeueExposed) => replica.plant_batch_requeue_exposed(),
            Some(Planted::LazyVotes) => replica.plant_lazy_votes(),
            None => {}
        }
        Box::new(replica)
    }
    fn runs_sim_env(&self) -> bool {
        true
    }
}

/// The embedded default components, in wasmtime.
pub struct WasmFactory(pub ballot_runtime::Runtime);

impl CoreFactory for WasmFactory {
    fn make(&self, config: Config) -> Box<dyn Core> {
        Box::new(
            self.0
                .replica(config)
                .expect("instantiating the protocol component"),
        )
    }
}

/// Two protocol components at once: the embedded one (0.7.0, key-state
/// format 3) and `protocol-next` (0.8.0, format 4), chosen per replica and
/// incarnation, so the cluster always runs mixed versions and every
/// crash-restart swaps the replica to the other one: upgrades and rollbacks
/// with migration on read, under every fault the simulator injects.
pub struct SwapFactory {
    pub current: ballot_runtime::Runtime,
    pub next: ballot_runtime::Runtime,
}

impl SwapFactory {
    pub fn embedded() -> Result<SwapFactory, ballot_runtime::Error> {
        use ballot_runtime::{Runtime, PROTOCOL_NEXT_WASM, PROTOCOL_WASM, REGISTER_WASM};
        Ok(SwapFactory {
            current: Runtime::with_components(PROTOCOL_WASM, REGISTER_WASM)?,
            next: Runtime::with_components(PROTOCOL_NEXT_WASM, REGISTER_WASM)?,
        })
    }
}

impl CoreFactory for SwapFactory {
    fn make_running(&self, config: Config, label: &str) -> Box<dyn Core> {
        let rt = if label == NEXT {
            &self.next
        } else {
            &self.current
        };
        Box::new(
            rt.replica(config)
                .expect("instantiating the protocol component"),
        )
    }
    fn make(&self, config: Config) -> Box<dyn Core> {
        let rt = if (config.self_id as u64 + config.incarnation) % 2 == 0 {
            &self.current
        } else {
            &self.next
        };
        Box::new(
            rt.replica(config)
                .expect("instantiating the protocol component"),
        )
    }
}

/// splitmix64: small, fast, and the same everywhere.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x5851_f42d_4c95_7f2d)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
    /// True with probability `p` (0.0 to 1.0).
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

enum NodeInput {
    Request(Request),
    Message(Inbound),
    Timer(Timer),
}

#[derive(Debug)]
enum Ev {
    Wake(usize),
    /// To a node, a message, and the directory identity its sender had when
    /// it sent it (what its hello presented).
    Deliver(usize, Inbound, u64),
    Fire(usize, u64, Timer),
    Persisted(usize, u64, u64),
    Client(usize),
    Crash(usize),
    Restart(usize),
    Partition,
    Heal,
    /// The next fault of the run, while clients are busy.
    Fault,
    /// Every replica crashes at once.
    CrashAll,
    /// A replica looks for a newer membership (the host's commit watch and
    /// poll).
    Poll(usize),
    /// The membership driver checks its stage.
    Drive,
    /// An operator starts its activation.
    Activate(usize),
    /// An operator's activation takes its next step.
    Operate(usize),
    /// A replica polls the configuration.
    Follow(usize),
    /// A swap's drain deadline may have passed.
    SwapDeadline,
    /// A replica replays its peers' changelogs.
    Replay(usize),
    /// A replica truncates its changelog.
    Truncate(usize),
    /// A replay read is tried again: replica, pass, key, attempts so far.
    ReplayRetry(usize, u64, Vec<u8>, u32),
    /// The listing check looks (`SimConfig::listing`).
    List,
    /// A lock holder's next step.
    Hold(usize),
    /// A replica's lease reaper looks.
    Reap(usize),
}

/// The peer address a simulated replica's record lists (never dialled).
fn peer_addr(id: ReplicaId) -> std::net::SocketAddr {
    ([127, 0, 0, 1], 7000 + id as u16).into()
}

/// One change of the plan: a node index joins or leaves.
#[derive(Clone, Copy, Debug)]
enum PlannedChange {
    Add(usize),
    Remove(usize),
}

struct Node {
    id: ReplicaId,
    core: Option<Box<dyn Core>>,
    incarnation: u64,
    durable: BTreeMap<Vec<u8>, Vec<u8>>,
    /// The daemon's ready pipeline, the same code: numbering, early
    /// actions, the overlay of states not durable yet.
    pipeline: Pipeline,
    /// Readies on their way to the disk, in order: the incarnation that
    /// made each, its host number, its writes.
    disk: VecDeque<(u64, u64, Vec<Write>)>,
    disk_free_at: u64,
    inbox: Vec<NodeInput>,
    wake_pending: bool,
    /// Request id -> index into the history.
    requests: BTreeMap<u64, usize>,
    /// Request id -> a read the replica makes for its membership task.
    chores: BTreeMap<u64, (Task, Vec<u8>)>,
    /// Request id -> a request of its host's control plane, and where it is
    /// in the history.
    sys: BTreeMap<u64, (usize, SysCall)>,
    /// Requests its instance took and has not answered.
    admitted: BTreeSet<u64>,
    /// The protocol it runs and how it follows the configuration.
    following: Following,
    /// Crashes so far.
    lives: u64,
    /// Its changelog, its cursors for its peers, the replay it runs.
    log: Log,
    /// The membership task it runs (the driver asked for it), with the
    /// keys it still has to read; forgotten at a crash, as the daemon's.
    task: Option<(Task, BTreeSet<Vec<u8>>)>,
    /// What it reports: the newest epochs it swept and caught up at
    /// (in memory in the daemon: 0 again after a restart).
    swept: u64,
    caught_up: u64,
    /// The membership epoch its core runs.
    epoch: u64,
    /// The epoch it resumes after a crash: the host's copy of the
    /// membership record in LMDB, written before the core runs it.
    durable_epoch: u64,
    /// Not a member yet (a spare) or not any more: never restarted.
    off: bool,
    /// Removed while it was down: it comes back on the membership it had
    /// and votes in it until its first poll tells it that it was removed,
    /// as a daemon restarted on a removed replica's directory does.
    removed: bool,
    /// Restarted, it has not polled the membership yet: until then it
    /// learns a newer epoch only from a peer's stamp. The daemon's first
    /// poll is a read at the stale epoch, which peers fence off, so it
    /// fails after its 10 s timeout and the replica then fetches a peer's
    /// record: 0-10 s here.
    behind_until: u64,
    /// Its data directory's identity, drawn when the directory is created.
    identity: u64,
    /// The identity first seen for each peer (by node index), durable: a
    /// message presenting another is dropped.
    known: BTreeMap<usize, u64>,
    /// Its directory is new and not admitted yet: it votes once every
    /// other replica has taken its hello (durable).
    pending: bool,
}

struct Client {
    remaining: usize,
    seq: usize,
    busy: bool,
    last_version: u64,
}

/// Network fault rates drawn once per run.
struct Faults {
    drop: f64,
    dup: f64,
    long_delay: f64,
}

pub struct Sim<'f> {
    /// Directed links that drop everything: (from, to) node indexes.
    cut: BTreeSet<(usize, usize)>,
    /// Each replica's clock offset from simulated time, in ms.
    skew: Vec<i64>,
    /// Every classic ballot seen in an Accept: (key, slot, ballot) -> id.
    ballots: BTreeMap<(Vec<u8>, u64, Ballot), ProposalId>,
    /// Every prepare a replica started: (node, incarnation, key, slot,
    /// ballot) -> the release that sent it. Within one incarnation a
    /// replica never prepares one ballot twice (a retry takes a higher one).
    prepares: BTreeMap<(usize, u64, Vec<u8>, u64, Ballot), u64>,
    /// Every query id a replica sent -> the incarnation that sent it: ids
    /// are unique across incarnations.
    queries: BTreeMap<(usize, u64), u64>,
    /// Counts the batches of actions applied, to tell a broadcast (one
    /// batch, many messages) from two attempts.
    releases: u64,
    /// Draws the deadlines, apart from `rng`, so runs without deadlines
    /// replay the same schedules as before they existed.
    policy_rng: Rng,
    /// Draws the corruption, apart from `rng` for the same reason.
    disk_rng: Rng,
    /// Draws the crashes at membership stage boundaries, likewise.
    stage_rng: Rng,
    /// Draws the lost data directories and their identities, likewise.
    wipe_rng: Rng,
    /// Draws when a restarted replica first polls the membership.
    epoch_rng: Rng,
    /// Draws the activations and who cannot run what.
    swap_rng: Rng,
    /// The run's activations, by operator (`None` before it starts).
    operators: Vec<Option<Operator>>,
    /// Draws when replicas replay and truncate.
    replay_rng: Rng,
    /// With leases: the holders, each replica's reaper, the holds that
    /// ended (holder, turn, from, until) and the fencing tokens won
    /// (holder, turn, token), and the draws.
    holders: Vec<leases::Holder>,
    reapers: Vec<leases::Reaper>,
    holds: Vec<(usize, usize, u64, u64)>,
    lock_tokens: Vec<(usize, usize, u64)>,
    lease_rng: Rng,
    /// With listing: the keys a client write was acknowledged for, and the
    /// draws of the check's times.
    acked: BTreeSet<Vec<u8>>,
    rng_listing: Rng,
    /// With replay: the end of the quiet time after the clients finished.
    quiet_until: Option<u64>,
    /// With the membership record through consensus: the two drivers, the
    /// versions chosen and not applied yet, the start-up record, and the
    /// draws of the operator's replica.
    drivers: Vec<Option<records::SimDriver>>,
    chosen_records: BTreeMap<u64, Option<Vec<u8>>>,
    bootstrap: MembersRecord,
    members_rng: Rng,
    /// The run's one random crash of the whole cluster happened (those at
    /// membership stages are apart).
    crashed_all: bool,
    /// A data directory was lost in this run (at most one).
    wiped: bool,
    /// A record was corrupted in this run (at most one), and its key.
    corrupted: bool,
    corrupted_keys: BTreeSet<Vec<u8>>,
    cfg: SimConfig,
    factory: &'f dyn CoreFactory,
    rng: Rng,
    now: u64,
    seq: u64,
    events: BTreeMap<(u64, u64), Ev>,
    nodes: Vec<Node>,
    clients: Vec<Client>,
    faults: Faults,
    history: Vec<Record>,
    chosen: BTreeMap<(Vec<u8>, u64), Option<Vec<u8>>>,
    violations: Vec<String>,
    stats: Stats,
    request_next: u64,
    fault_window_ms: u64,
    /// Crashes left to inject in the middle of a stalled write.
    stall_crashes: u32,
    /// Every membership published, by epoch - 1.
    memberships: Vec<Members>,
    /// Changes not queued yet.
    plan: VecDeque<PlannedChange>,
    /// The membership record and its version: the newest version of
    /// `\0ballot/members` consensus chose, applied in order
    /// (`simulator::records`).
    record: MembersRecord,
    record_version: u64,
}

const TIME_LIMIT_MS: u64 = 600_000;

impl<'f> Sim<'f> {
    pub fn new(mut cfg: SimConfig, factory: &'f dyn CoreFactory) -> Self {
        cfg.deadlines &= factory.runs_sim_env();
        let mut rng = Rng::new(cfg.seed);
        let faults = if cfg.faults {
            Faults {
                drop: rng.range(0, 10) as f64 / 100.0,
                dup: rng.range(0, 5) as f64 / 100.0,
                long_delay: 0.05,
            }
        } else {
            Faults {
                drop: 0.0,
                dup: 0.0,
                long_delay: 0.0,
            }
        };
        let voters: Vec<ReplicaId> = (1..=cfg.nodes as ReplicaId).collect();
        let spares = if cfg.reconfigure { SPARES } else { 0 };
        let mut swap_rng = Rng::new(cfg.seed ^ 0x5_a9ac);
        let nodes: Vec<Node> = (1..=(cfg.nodes + spares) as ReplicaId)
            .map(|id| {
                let off = id as usize > cfg.nodes;
                Node {
                    id,
                    core: (!off).then(|| factory.make(Config::new(id, 1, voters.clone()))),
                    incarnation: 1,
                    durable: BTreeMap::new(),
                    pipeline: pipeline(&cfg),
                    disk: VecDeque::new(),
                    disk_free_at: 0,
                    inbox: Vec::new(),
                    wake_pending: false,
                    requests: BTreeMap::new(),
                    chores: BTreeMap::new(),
                    sys: BTreeMap::new(),
                    admitted: BTreeSet::new(),
                    following: Following::new(cfg.activations && !off && swap_rng.chance(0.1)),
                    lives: 0,
                    log: Log::default(),
                    task: None,
                    swept: 0,
                    caught_up: 0,
                    epoch: 1,
                    durable_epoch: 1,
                    off,
                    removed: false,
                    behind_until: 0,
                    identity: id as u64,
                    // Every replica of the first membership was admitted
                    // by all the others before it voted, so each knows
                    // each; joiners are learnt on first sight.
                    known: (1..=cfg.nodes as u64)
                        .filter(|&j| !off && j != id as u64)
                        .map(|j| (j as usize - 1, j))
                        .collect(),
                    pending: false,
                }
            })
            .collect();
        let bootstrap = MembersRecord::bootstrap(
            voters
                .iter()
                .map(|&id| members::Member {
                    id,
                    addr: peer_addr(id),
                    http: None,
                    role: Role::Voter,
                })
                .collect(),
        );
        let mut plan = VecDeque::new();
        if cfg.reconfigure {
            // Two joins and two leaves of original replicas, interleaved
            // as the seed says, never below the starting size.
            let mut leaving: Vec<usize> = (0..cfg.nodes).collect();
            let mut joins = vec![cfg.nodes, cfg.nodes + 1];
            let mut size = cfg.nodes;
            while !joins.is_empty() || leaving.len() > cfg.nodes.saturating_sub(2) {
                let leave = leaving.len() > cfg.nodes.saturating_sub(2)
                    && size > cfg.nodes.max(2) - 1
                    && (joins.is_empty() || rng.chance(0.5))
                    && size > 1;
                if leave {
                    let k = rng.range(0, leaving.len() as u64 - 1) as usize;
                    plan.push_back(PlannedChange::Remove(leaving.remove(k)));
                    size -= 1;
                } else if let Some(j) = joins.pop() {
                    plan.push_back(PlannedChange::Add(j));
                    size += 1;
                } else {
                    break;
                }
            }
        }
        let clients = (0..cfg.clients)
            .map(|_| Client {
                remaining: cfg.ops_per_client,
                seq: 0,
                busy: false,
                last_version: 0,
            })
            .collect();
        let n = nodes.len();
        let skew = (0..n)
            .map(|_| {
                if cfg.faults {
                    rng.range(0, 1000) as i64 - 500
                } else {
                    0
                }
            })
            .collect();
        let stall_crashes = if cfg.fsync_crashes { 30 } else { 3 };
        Sim {
            cut: BTreeSet::new(),
            skew,
            ballots: BTreeMap::new(),
            prepares: BTreeMap::new(),
            queries: BTreeMap::new(),
            releases: 0,
            policy_rng: Rng::new(cfg.seed ^ 0xd1_5eed_d1),
            disk_rng: Rng::new(cfg.seed ^ 0xd15c_0bad),
            stage_rng: Rng::new(cfg.seed ^ 0x57a9e),
            wipe_rng: Rng::new(cfg.seed ^ 0xd1_7ec7),
            epoch_rng: Rng::new(cfg.seed ^ 0xe90c4),
            swap_rng,
            operators: Vec::new(),
            replay_rng: Rng::new(cfg.seed ^ 0x4e_91a7),
            holders: Vec::new(),
            corrupted_keys: BTreeSet::new(),
            reapers: Vec::new(),
            holds: Vec::new(),
            lock_tokens: Vec::new(),
            lease_rng: Rng::new(cfg.seed ^ 0x1ea5_e5),
            acked: BTreeSet::new(),
            rng_listing: Rng::new(cfg.seed ^ 0x0715_7a),
            quiet_until: None,
            drivers: vec![None, None],
            chosen_records: BTreeMap::new(),
            bootstrap: bootstrap.clone(),
            members_rng: Rng::new(cfg.seed ^ 0x3e3b_e125),
            wiped: false,
            corrupted: false,
            crashed_all: false,
            cfg,
            factory,
            rng,
            now: 0,
            seq: 0,
            events: BTreeMap::new(),
            nodes,
            clients,
            faults,
            history: Vec::new(),
            chosen: BTreeMap::new(),
            violations: Vec::new(),
            stats: Stats::default(),
            request_next: 1,
            fault_window_ms: 1500,
            stall_crashes,
            record: bootstrap,
            record_version: 0,
            memberships: vec![Members::initial(voters)],
            plan,
        }
    }

    fn at(&mut self, time: u64, ev: Ev) {
        self.seq += 1;
        self.events.insert((time, self.seq), ev);
    }

    /// A global order of events, used as the history's clock.
    fn tick(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn key(&self, i: usize) -> Vec<u8> {
        format!("k{i}").into_bytes()
    }

    pub fn run(mut self) -> Report {
        for c in 0..self.clients.len() {
            let t = self.rng.range(0, 20);
            self.at(t, Ev::Client(c));
        }
        if self.cfg.faults {
            let crashes = self.rng.range(0, self.cfg.nodes as u64);
            for _ in 0..crashes {
                let t = self.rng.range(0, self.fault_window_ms);
                let node = self.rng.range(0, self.nodes.len() as u64 - 1) as usize;
                self.at(t, Ev::Crash(node));
            }
            let partitions = self.rng.range(0, 3);
            for _ in 0..partitions {
                let t = self.rng.range(0, self.fault_window_ms);
                self.at(t, Ev::Partition);
                let d = self.rng.range(10, 400);
                self.at(t + d, Ev::Heal);
            }
            // And faults for as long as the clients run.
            let t = self
                .rng
                .range(self.fault_window_ms, 2 * self.fault_window_ms);
            self.at(t, Ev::Fault);
        }
        if self.cfg.activations {
            self.plan_activations();
        }
        if self.cfg.replay {
            self.plan_replay();
        }
        if self.cfg.leases {
            self.plan_leases();
        }
        if self.cfg.listing {
            self.at(100, Ev::List);
        }
        if self.cfg.reconfigure {
            let t = self.rng.range(0, 300);
            self.at(t, Ev::Drive);
            for i in 0..self.nodes.len() {
                let t = self.rng.range(0, 100);
                self.at(t, Ev::Poll(i));
            }
        }
        while let Some(((time, _), ev)) = self.events.pop_first() {
            self.now = time;
            if time > TIME_LIMIT_MS {
                self.violations.push(format!(
                    "liveness: run still busy after {TIME_LIMIT_MS} ms of simulated time"
                ));
                break;
            }
            self.handle(ev);
            if self.cfg.activations {
                self.try_swaps();
            }
            if self.cfg.reconfigure {
                self.apply_chosen_records();
            }
            if self.clients.iter().all(|c| c.remaining == 0 && !c.busy)
                && self.plan_done()
                && self.activations_done()
                && self.leases_done()
                && self.quiet_done()
            {
                break;
            }
        }
        self.stats.virtual_ms = self.now;
        self.finish()
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Wake(i) => self.wake(i),
            Ev::Deliver(i, m, identity) => {
                if self.nodes[i].core.is_some() && self.admits(i, &m, identity) {
                    self.ahead(i, &m);
                    if self.nodes[i].core.is_none() {
                        return;
                    }
                    self.nodes[i].inbox.push(NodeInput::Message(m));
                    self.schedule_wake(i);
                }
            }
            Ev::Fire(i, inc, t) => {
                if self.nodes[i].core.is_some() && self.nodes[i].incarnation == inc {
                    self.nodes[i].inbox.push(NodeInput::Timer(t));
                    self.schedule_wake(i);
                }
            }
            Ev::Persisted(i, inc, id) => self.persisted(i, inc, id),
            Ev::Client(c) => self.client_next(c),
            Ev::Crash(i) => self.crash(i),
            Ev::Restart(i) => self.restart(i),
            Ev::Partition => self.partition(),
            Ev::Heal => self.cut.clear(),
            Ev::Fault => self.fault(),
            Ev::CrashAll => {
                self.stats.cluster_crashes += 1;
                for i in 0..self.nodes.len() {
                    self.crash(i);
                }
            }
            Ev::Poll(i) => {
                self.poll(i);
                let t = self.now + self.rng.range(20, 150);
                self.at(t, Ev::Poll(i));
            }
            Ev::Drive => {
                self.drive_through_consensus();
                if !self.plan_done() {
                    let t = self.now + 10;
                    self.at(t, Ev::Drive);
                }
            }
            Ev::Activate(k) => self.activate(k),
            Ev::Operate(k) => self.operate(k),
            Ev::Follow(i) => {
                if !self.activations_done() {
                    self.follow_poll(i)
                }
            }
            Ev::SwapDeadline => {}
            Ev::Replay(i) => self.replay_tick(i),
            Ev::Truncate(i) => self.truncate_tick(i),
            Ev::ReplayRetry(i, generation, key, attempts) => {
                self.replay_retry(i, generation, key, attempts)
            }
            Ev::Hold(h) => self.hold(h),
            Ev::List => {
                self.check_listing();
                if !self.clients.iter().all(|c| c.remaining == 0 && !c.busy) {
                    let t = self.now + self.rng_listing.range(100, 300);
                    self.at(t, Ev::List);
                }
            }
            Ev::Reap(i) => self.reap(i),
        }
    }

    // ----- faults ---------------------------------------------------------

    /// Cuts links: both ways between two random sides, or one way between a
    /// replica and every other (it hears them but is not heard, or the
    /// reverse).
    fn partition(&mut self) {
        self.stats.partitions += 1;
        let n = self.nodes.len();
        if self.rng.chance(0.5) {
            let side: Vec<bool> = (0..n).map(|_| self.rng.chance(0.5)).collect();
            for a in 0..n {
                for b in 0..n {
                    if side[a] != side[b] {
                        self.cut.insert((a, b));
                    }
                }
            }
        } else {
            let x = self.rng.range(0, n as u64 - 1) as usize;
            let outgoing = self.rng.chance(0.5);
            for o in (0..n).filter(|&o| o != x) {
                self.cut.insert(if outgoing { (x, o) } else { (o, x) });
            }
        }
    }

    /// One fault of the run's steady stream, then the next one's time.
    fn fault(&mut self) {
        // Faults go on while clients or lock holders are busy.
        if self.clients.iter().all(|c| c.remaining == 0 && !c.busy) && self.leases_done() {
            return;
        }
        let n = self.nodes.len() as u64;
        match self.rng.range(0, 19) {
            0..=6 => {
                // Short or long, and sometimes overlapping the next one.
                self.partition();
                let d = if self.rng.chance(0.3) {
                    self.rng.range(500, 3000)
                } else {
                    self.rng.range(10, 400)
                };
                let t = self.now + d;
                self.at(t, Ev::Heal);
            }
            7..=11 => {
                let i = self.rng.range(0, n - 1) as usize;
                self.crash(i);
            }
            12..=16 => {
                // A clock jumps forward or back.
                let i = self.rng.range(0, n - 1) as usize;
                self.skew[i] += self.rng.range(0, 2000) as i64 - 1000;
                self.stats.clock_jumps += 1;
            }
            17 if !self.crashed_all && self.rng.chance(0.3) => {
                self.crashed_all = true;
                let t = self.now;
                self.at(t, Ev::CrashAll);
            }
            _ => {}
        }
        let t = self.now + self.rng.range(100, 1500);
        self.at(t, Ev::Fault);
    }

    /// Whether replica `i` takes a message whose sender presented directory
    /// `identity`: the first identity seen for a peer is recorded (durably,
    /// as the daemon commits it before the stream's first message), and
    /// every other one is refused.
    fn admits(&mut self, i: usize, m: &Inbound, identity: u64) -> bool {
        let from = m.from as usize - 1;
        let known = *self.nodes[i].known.entry(from).or_insert(identity);
        if known == identity || self.cfg.unchecked_identity {
            true
        } else {
            self.stats.refused += 1;
            false
        }
    }

    /// Replica `i`'s clock now.
    fn clock(&self, i: usize) -> u64 {
        (self.now as i64 + self.skew[i]).max(0) as u64
    }

    /// Checks what a message says against what is known to be chosen and
    /// against every earlier Accept: one proposal per classic ballot of a
    /// slot, and one value per version.
    fn inspect(&mut self, from: usize, release: u64, m: &Inbound) {
        let Ok((_, msg)) = Msg::decode_any(&m.payload) else {
            self.violations.push(format!(
                "replica {} sent an undecodable message",
                self.nodes[from].id
            ));
            return;
        };
        let inc = self.nodes[from].incarnation;
        if let Msg::Accept { proposal, .. } | Msg::Continue { proposal, .. } = &msg {
            if proposal.count > 1 {
                self.stats.batched += 1;
            }
        }
        match &msg {
            Msg::Continue { .. } => self.stats.continues += 1,
            Msg::Forward { .. } => self.stats.forwards += 1,
            Msg::Forwarded { .. } => self.stats.forward_replies += 1,
            _ => {}
        }
        match msg {
            Msg::Prepare {
                slot,
                ballot,
                catch_up: None,
            } => {
                let at = (from, inc, m.key.clone(), slot, ballot);
                match self.prepares.get(&at) {
                    Some(r) if *r != release => self.violations.push(format!(
                        "replica {} prepared ballot ({}, {}) twice at {} slot {slot}",
                        self.nodes[from].id,
                        ballot.counter,
                        ballot.replica,
                        String::from_utf8_lossy(&m.key),
                    )),
                    Some(_) => {}
                    None => {
                        self.prepares.insert(at, release);
                    }
                }
            }
            Msg::Query { id } | Msg::Forward { id, .. } => match self.queries.get(&(from, id)) {
                Some(i) if *i != inc => self.violations.push(format!(
                    "replica {} sent query id {id} (a query or a forward) in incarnations {i} and {inc}",
                    self.nodes[from].id
                )),
                Some(_) => {}
                None => {
                    self.queries.insert((from, id), inc);
                }
            },
            Msg::Accept {
                slot,
                ballot,
                proposal,
                ..
            }
            | Msg::Continue {
                slot,
                ballot,
                proposal,
                ..
            } if !ballot.is_fast() => {
                let at = (m.key.clone(), slot, ballot);
                match self.ballots.get(&at) {
                    Some(id) if *id != proposal.id => self.violations.push(format!(
                        "ballot ({}, {}) carried two proposals at {} slot {slot}: {id:?} and {:?}",
                        ballot.counter,
                        ballot.replica,
                        String::from_utf8_lossy(&m.key),
                        proposal.id
                    )),
                    Some(_) => {}
                    None => {
                        self.ballots.insert(at, proposal.id);
                    }
                }
            }
            Msg::Learn { chosen } | Msg::Stale { chosen } if chosen.version > 0 => {
                let node = self.nodes[from].id;
                self.record_commit(&m.key, chosen.version, &chosen.value, node);
            }
            _ => {}
        }
    }

    // ----- membership -----------------------------------------------------

    /// With replay, once everything else is done: the network heals and
    /// the run goes on for [`QUIET_MS`] before it is checked.
    fn quiet_done(&mut self) -> bool {
        if !self.cfg.replay {
            return true;
        }
        match self.quiet_until {
            Some(t) => self.now >= t,
            None => {
                self.quiet_until = Some(self.now + QUIET_MS);
                self.cut.clear();
                false
            }
        }
    }

    /// Every change is through, and every member that is up runs the last
    /// epoch (as the daemon's driver is idle only once each reported it).
    fn plan_done(&self) -> bool {
        let epoch = self.latest().epoch;
        self.plan.is_empty()
            && self.record.queue.is_empty()
            && self.nodes.iter().all(|n| {
                n.core.is_none()
                    || n.off
                    || !self.record.replicas.iter().any(|m| m.id == n.id)
                    || n.epoch == epoch
            })
    }

    fn latest(&self) -> &Members {
        self.memberships.last().expect("epoch 1 exists")
    }

    /// A message stamped with a newer epoch than its receiver runs: the
    /// daemon's transport reports it, and the membership task fetches the
    /// record at once.
    fn ahead(&mut self, i: usize, m: &Inbound) {
        if let Ok((epoch, _)) = Msg::decode_any(&m.payload) {
            if epoch > self.nodes[i].epoch {
                self.nodes[i].behind_until = 0;
                self.poll(i);
            }
        }
    }

    /// A replica that is up adopts the newest membership, as the host does
    /// when it applies a commit of the membership record or polls it. One
    /// that restarted missed the commits made while it was down: it runs the
    /// epoch it resumed until a peer's newer stamp or its first poll, up
    /// to 10 s later.
    fn poll(&mut self, i: usize) {
        let latest = self.latest().clone();
        let volatile = self.cfg.volatile_epoch;
        {
            let node = &self.nodes[i];
            if node.off
                || node.epoch >= latest.epoch
                || node.core.is_none()
                || self.now < node.behind_until
            {
                return;
            }
        }
        if self.nodes[i].removed {
            // It learns that it was removed, and stops for good.
            self.crash(i);
            self.nodes[i].off = true;
            return;
        }
        let node = &mut self.nodes[i];
        let Some(core) = node.core.as_mut() else {
            return;
        };
        match core.reconfigure(latest.clone()) {
            Ok(()) => {
                node.epoch = latest.epoch;
                if !volatile {
                    node.durable_epoch = latest.epoch;
                }
            }
            Err(e) => self.violations.push(format!(
                "replica {} refused epoch {}: {e}",
                node.id, latest.epoch
            )),
        }
    }

    /// What a listing through each replica that is up rests on (see
    /// [`SimConfig::listing`]): the voters of its epoch that could answer
    /// it (up, and taken by the lister: not a lost directory it knew by
    /// another) without holding an acknowledged key must not be a classic
    /// quorum.
    fn check_listing(&mut self) {
        let mut found = Vec::new();
        for i in 0..self.nodes.len() {
            let node = &self.nodes[i];
            if node.core.is_none() || node.off {
                continue;
            }
            let members = self.members_at(node.epoch);
            let q = ballot_core::quorum_classic(members.voters.len());
            // A voter's answer counts if it is up, does not run a newer
            // epoch than the lister (answers are fenced by epoch, section
            // 11, and epochs only grow; one on an older epoch may adopt the
            // lister's and answer later) and the lister takes its messages
            // (it knows the voter by its present directory, as `admits`
            // decides).
            let answering: Vec<ReplicaId> = members
                .voters
                .iter()
                .copied()
                .filter(|&v| {
                    let j = v as usize - 1;
                    let n = &self.nodes[j];
                    let known = node.known.get(&j).is_none_or(|&id| id == n.identity);
                    n.core.is_some()
                        && !n.off
                        && n.epoch <= node.epoch
                        && (j == i || known || self.cfg.unchecked_identity)
                })
                .collect();
            for key in &self.acked {
                let lacking: Vec<ReplicaId> = answering
                    .iter()
                    .copied()
                    .filter(|&v| !self.nodes[v as usize - 1].durable.contains_key(key))
                    .collect();
                if lacking.len() >= q {
                    found.push(format!(
                        "listing: through replica {} (epoch {}), voters {lacking:?} could answer \
                         without key {} a write to it was acknowledged for",
                        node.id,
                        node.epoch,
                        String::from_utf8_lossy(key)
                    ));
                }
            }
        }
        if let Some(first) = found.into_iter().next() {
            if !self.violations.contains(&first) {
                self.violations.push(first);
            }
        }
    }

    fn members_at(&self, epoch: u64) -> Members {
        self.memberships[epoch as usize - 1].clone()
    }

    /// `--planted unsafe-membership`: a record that only turns the fast
    /// round off is replaced by the one the change ends with once the
    /// classic epoch was swept, published in its place.
    fn skip_the_classic_epoch(&self, read: &MembersRecord, next: MembersRecord) -> MembersRecord {
        if !(read.fast && !next.fast) {
            return next;
        }
        let swept: BTreeMap<ReplicaId, stages::Report> = next
            .replicas
            .iter()
            .map(|m| {
                let all = u64::MAX;
                (
                    m.id,
                    stages::Report {
                        epoch: all,
                        swept: all,
                        caught_up: all,
                    },
                )
            })
            .collect();
        match stages::step(&next, &swept, self.now) {
            stages::Step::Publish(mut last) => {
                last.epoch = next.epoch;
                last
            }
            _ => next,
        }
    }

    /// Makes `next` the record: a replica it adds starts on an empty
    /// directory, one it drops is told at its next poll.
    fn adopt_record(&mut self, next: MembersRecord) {
        let listed = |r: &MembersRecord, id: ReplicaId| r.replicas.iter().any(|m| m.id == id);
        for m in &next.replicas {
            // A replica that runs already (listed again after a record
            // that dropped it, which only a broken driver publishes) is
            // the same process: it is not started twice.
            if !listed(&self.record, m.id) && self.nodes[m.id as usize - 1].core.is_none() {
                let node = &mut self.nodes[m.id as usize - 1];
                node.off = false;
                let config = Config::new(
                    node.id,
                    node.incarnation,
                    self.memberships[0].voters.clone(),
                );
                // A joiner starts on the embedded protocol and follows the
                // configuration like any replica.
                let core = if self.cfg.activations {
                    self.factory.make_running(config, EMBEDDED)
                } else {
                    self.factory.make(config)
                };
                node.core = Some(core);
                node.epoch = 1;
                node.durable_epoch = 1;
            }
        }
        for m in &self.record.replicas {
            if !listed(&next, m.id) {
                // A removed replica runs on until its next poll tells it,
                // and stops for good then; one that is down comes back on
                // the epoch it had first.
                let y = m.id as usize - 1;
                self.nodes[y].removed = true;
                if self.nodes[y].core.is_none() {
                    self.stats.removed_down += 1;
                }
            }
        }
        if next.queue.len() < self.record.queue.len() {
            self.stats.changes += 1;
        }
        if next.epoch > self.record.epoch {
            debug_assert_eq!(next.epoch as usize, self.memberships.len() + 1);
            self.memberships.push(next.members());
        }
        self.record = next;
    }

    /// Crash-restarts as the driver moves on, so every stage meets one: a
    /// replica goes down just as a record is published, or the whole
    /// cluster does (a power cut, a rollout that restarts every replica).
    fn stage_crash(&mut self) {
        if !(self.cfg.faults && self.stage_rng.chance(0.2)) {
            return;
        }
        let up: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].core.is_some())
            .collect();
        if self.stage_rng.chance(0.1) {
            self.stats.stage_crashes += 1;
            self.stats.cluster_crashes += 1;
            for i in up {
                self.crash(i);
            }
        } else if !up.is_empty() {
            let i = up[self.stage_rng.range(0, up.len() as u64 - 1) as usize];
            self.stats.stage_crashes += 1;
            self.crash(i);
        }
    }

    /// Starts `task` on node `i` unless it runs or is done, as the
    /// daemon's membership task does: both read every key a classic quorum
    /// of voters holds durable state for.
    fn start_task(&mut self, i: usize, task: Task) {
        let node = &self.nodes[i];
        let done = match task {
            Task::CatchUp { epoch } => node.caught_up >= epoch,
            Task::Sweep { epoch } => node.swept >= epoch,
        };
        if node.core.is_none() || done || node.task.as_ref().is_some_and(|(t, _)| *t == task) {
            return;
        }
        // The daemon lists every key a classic quorum of voters holds
        // state for in LMDB (a vote still on its way to the disk is not
        // listed; the system records are listed too), asking in the order
        // `listers` gives, and reads each; it waits while fewer than a
        // quorum answer.
        let (order, quorum) = stages::listers(&self.record.voters(), node.id);
        let answering: Vec<usize> = order
            .iter()
            .map(|&v| v as usize - 1)
            .filter(|&v| self.nodes[v].core.is_some())
            .take(quorum)
            .collect();
        let answering = match task {
            Task::Sweep { .. } if self.cfg.planted_sweep_own_keys => vec![i],
            _ if answering.len() < quorum => return,
            _ => answering,
        };
        let keys: BTreeSet<Vec<u8>> = answering
            .iter()
            .flat_map(|&v| {
                self.nodes[v]
                    .durable
                    .iter()
                    .filter(|(_, s)| !s.is_empty())
                    .map(|(k, _)| k.clone())
            })
            .collect();
        let empty = keys.is_empty();
        self.nodes[i].task = Some((task, keys));
        if empty {
            self.task_done(i, task.epoch());
        }
    }

    /// Issues the reads of every running task that are not in flight.
    fn run_tasks(&mut self) {
        for n in 0..self.nodes.len() {
            if self.nodes[n].core.is_none() {
                continue;
            }
            let Some((task, keys)) = self.nodes[n].task.clone() else {
                continue;
            };
            let busy: BTreeSet<Vec<u8>> = self.nodes[n]
                .chores
                .values()
                .map(|(_, k)| k.clone())
                .collect();
            for key in keys.into_iter().filter(|k| !busy.contains(k)) {
                let id = self.request_next;
                self.request_next += 1;
                self.nodes[n].chores.insert(id, (task, key.clone()));
                self.nodes[n].inbox.push(NodeInput::Request(Request {
                    id,
                    key,
                    op: Operation::Read(Consistency::Linearizable),
                }));
                self.schedule_wake(n);
            }
        }
    }

    /// A read made for a membership task finished.
    fn chore_done(&mut self, i: usize, task: Task, key: Vec<u8>, outcome: Outcome) {
        if !matches!(outcome, Outcome::Done(_)) {
            return;
        }
        let node = &mut self.nodes[i];
        let Some((running, keys)) = node.task.as_mut() else {
            return;
        };
        if *running != task {
            return;
        }
        keys.remove(&key);
        if keys.is_empty() {
            self.task_done(i, task.epoch());
        }
    }

    fn task_done(&mut self, i: usize, epoch: u64) {
        let node = &mut self.nodes[i];
        match node.task.take() {
            Some((Task::CatchUp { .. }, _)) => node.caught_up = node.caught_up.max(epoch),
            Some((Task::Sweep { .. }, _)) => node.swept = node.swept.max(epoch),
            None => {}
        }
    }

    fn schedule_wake(&mut self, i: usize) {
        if !self.nodes[i].wake_pending {
            self.nodes[i].wake_pending = true;
            let now = self.now;
            self.at(now, Ev::Wake(i));
        }
    }

    fn wake(&mut self, i: usize) {
        let seed = self.rng.next();
        let now = self.now;
        let clock = self.clock(i);
        let node = &mut self.nodes[i];
        node.wake_pending = false;
        let Some(core) = node.core.as_mut() else {
            return;
        };
        let inbox = std::mem::take(&mut node.inbox);
        if inbox.is_empty() {
            return;
        }
        // While a swap drains, new requests wait in their queue.
        let swapping = node.following.swapping.is_some();
        let (inbox, held): (Vec<NodeInput>, Vec<NodeInput>) = inbox
            .into_iter()
            .partition(|m| !(swapping && matches!(m, NodeInput::Request(_))));
        node.inbox = held;
        if inbox.is_empty() {
            return;
        }
        let mut batch = Batch {
            now_ms: clock,
            seed,
            ..Batch::default()
        };
        let mut keys = BTreeSet::new();
        for input in inbox {
            match input {
                NodeInput::Request(r) => {
                    keys.insert(r.key.clone());
                    node.admitted.insert(r.id);
                    batch.requests.push(r);
                }
                NodeInput::Message(m) => {
                    keys.insert(m.key.clone());
                    batch.messages.push(m);
                }
                NodeInput::Timer(t) => {
                    keys.insert(t.key.clone());
                    batch.timers.push(t);
                }
            }
        }
        batch.states = keys
            .into_iter()
            .map(|key| KeyState {
                state: match node.pipeline.state(&key) {
                    Some(s) => s.to_vec(),
                    None => node.durable.get(&key).cloned().unwrap_or_default(),
                },
                key,
            })
            .collect();
        let mut ready = core.step(batch);
        self.stats.steps += 1;
        let stepped = node.pipeline.stepped(&mut ready);
        let inc = node.incarnation;
        if let Some(early) = stepped.early {
            self.apply(i, inc, early);
        }
        if stepped.durable_now {
            // Nothing to write and nothing before it, as in the daemon.
            return self.released(i, inc, stepped.host);
        }
        // Disks are usually quick, sometimes stall: the window between a
        // ready's early actions and its durability is where crashes bite.
        let stall = self
            .rng
            .chance(if self.cfg.fsync_crashes { 0.2 } else { 0.02 });
        let latency = if stall {
            self.rng.range(10, 40)
        } else {
            self.rng.range(0, 3)
        };
        let node = &mut self.nodes[i];
        let done = node.disk_free_at.max(now + latency);
        node.disk_free_at = done;
        node.disk.push_back((inc, ready.id, ready.persist));
        self.at(done, Ev::Persisted(i, inc, ready.id));
        // Now and then the replica dies in the middle of a stalled write,
        // after its early actions left and before the write is durable.
        let crash = if self.cfg.fsync_crashes { 0.5 } else { 0.25 };
        if stall && self.cfg.faults && self.stall_crashes > 0 && self.rng.chance(crash) {
            self.stall_crashes -= 1;
            self.at(done - 1, Ev::Crash(i));
        }
    }

    fn persisted(&mut self, i: usize, inc: u64, id: u64) {
        // A crash emptied the disk queue: what was on it is lost. A swap did
        // not: the old instance's writes still land (nothing of them is
        // released, the pipeline forgot that instance).
        let node = &self.nodes[i];
        let Some(&(n, h, _)) = node.disk.front().filter(|_| node.core.is_some()) else {
            return;
        };
        if n != inc {
            return;
        }
        assert_eq!(h, id, "the simulated disk completes in order");
        let (_, _, writes) = self.nodes[i]
            .disk
            .pop_front()
            .expect("a persisted ready is queued");
        for w in writes {
            if let Some(c) = &w.commit {
                self.record_commit(&w.key, c.version, &c.value, self.nodes[i].id);
                self.nodes[i].log.append(&w.key, c.version);
            }
            self.nodes[i].durable.insert(w.key, w.state);
        }
        let inc = self.nodes[i].incarnation;
        self.released(i, inc, id);
    }

    /// Readies up to host number `upto` are durable: applies and releases
    /// what the pipeline says, in its order.
    fn released(&mut self, i: usize, inc: u64, upto: u64) {
        let durable = self.nodes[i].pipeline.durable(upto);
        for step in durable.steps {
            let actions = match step {
                Step::Apply(actions) => actions,
                Step::Release(guest) => self.nodes[i].core.as_mut().expect("up").release(guest),
            };
            self.apply(i, inc, actions);
        }
        // The host applies the configuration it made durable, as the
        // daemon's commit watch does.
        for (_, commit) in durable.commits {
            if self.nodes[i].core.is_some() {
                self.consider(i, commit.version, commit.value);
            }
        }
    }

    /// Sends, arms and completes what a replica released.
    fn apply(&mut self, i: usize, inc: u64, actions: Actions) {
        self.releases += 1;
        for out in actions.send {
            let to = out.to as usize - 1;
            let from = self.nodes[i].id;
            self.transmit(
                i,
                to,
                Inbound {
                    from,
                    key: out.key,
                    payload: out.payload,
                },
            );
        }
        for t in actions.timers {
            // The replica's clock says when; the simulation's clock fires it.
            let at = ((t.at_ms as i64 - self.skew[i]).max(0) as u64).max(self.now);
            self.at(at, Ev::Fire(i, inc, t));
        }
        for c in actions.complete {
            self.answer(i, c.id, c.outcome);
        }
    }

    /// Replica `i` answered request `id`.
    fn answer(&mut self, i: usize, id: u64, outcome: Outcome) {
        self.nodes[i].admitted.remove(&id);
        if let Some(h) = self.nodes[i].requests.remove(&id) {
            self.complete(h, Some(outcome));
        } else if let Some((task, key)) = self.nodes[i].chores.remove(&id) {
            self.chore_done(i, task, key, outcome);
        } else if let Some((h, why)) = self.nodes[i].sys.remove(&id) {
            self.sys_done(i, id, h, why, Some(outcome));
        }
    }

    fn record_commit(
        &mut self,
        key: &[u8],
        version: u64,
        value: &Option<Vec<u8>>,
        node: ReplicaId,
    ) {
        match self.chosen.get(&(key.to_vec(), version)) {
            Some(v) if v != value => self.violations.push(format!(
                "agreement: replica {node} committed {:?} at {} version {version}, another replica {:?}",
                value.as_deref().map(String::from_utf8_lossy),
                String::from_utf8_lossy(key),
                v.as_deref().map(String::from_utf8_lossy),
            )),
            Some(_) => {}
            None => {
                self.chosen.insert((key.to_vec(), version), value.clone());
                if self.cfg.reconfigure && key == records::MEMBERS_KEY {
                    self.record_chosen(version, value.clone());
                }
            }
        }
    }

    fn transmit(&mut self, from: usize, to: usize, m: Inbound) {
        self.stats.messages += 1;
        self.inspect(from, self.releases, &m);
        if self.cut.contains(&(from, to)) || self.rng.chance(self.faults.drop) {
            self.stats.dropped += 1;
            return;
        }
        let copies = if self.rng.chance(self.faults.dup) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = if self.rng.chance(self.faults.long_delay) {
                self.rng.range(20, 200)
            } else {
                self.rng.range(1, 5)
            };
            let t = self.now + delay;
            let identity = self.nodes[from].identity;
            self.at(t, Ev::Deliver(to, m.clone(), identity));
        }
    }

    /// The replicas that are up and members of the newest membership.
    fn up_members(&self) -> Vec<usize> {
        let latest = self.latest();
        (0..self.nodes.len())
            .filter(|&i| {
                let n = &self.nodes[i];
                n.core.is_some() && !n.off && latest.contains(n.id)
            })
            .collect()
    }

    fn client_next(&mut self, c: usize) {
        if self.clients[c].remaining == 0 {
            return;
        }
        let up = self.up_members();
        if up.is_empty() {
            let t = self.now + 10;
            self.at(t, Ev::Client(c));
            return;
        }
        let node = up[self.rng.range(0, up.len() as u64 - 1) as usize];
        let k = self.rng.range(0, self.cfg.keys as u64 - 1) as usize;
        let key = self.key(k);
        let client = &mut self.clients[c];
        client.remaining -= 1;
        client.seq += 1;
        client.busy = true;
        let value = format!("c{c}.{}", client.seq).into_bytes();
        let last = client.last_version;
        let mut op = match self.rng.range(0, 9) {
            0 | 1 => Operation::Command(Command::Create(value).encode()),
            2 | 3 => Operation::Command(Command::Put(value).encode()),
            4 | 5 => {
                let expected = last.saturating_sub(self.rng.range(0, 1)) + self.rng.range(0, 1);
                Operation::Command(Command::Cas { expected, value }.encode())
            }
            6 => Operation::Command(Command::Delete.encode()),
            7 => Operation::Read(Consistency::Local),
            _ => Operation::Read(Consistency::Linearizable),
        };
        // A third of the commands must be applied before a deadline a little
        // ahead of the chosen replica's clock: its first evaluation usually
        // passes, a recovery's seconds later usually does not.
        if self.cfg.deadlines && self.policy_rng.chance(0.3) {
            if let Operation::Command(bytes) = &op {
                let deadline = self.clock(node) + self.policy_rng.range(0, 400);
                op = Operation::Command(with_deadline(deadline, bytes));
            }
        }
        let (id, h) = self.request(node, c, key, op);
        self.nodes[node].requests.insert(id, h);
    }

    /// Hands replica `i` a request of `client` (`usize::MAX`: of the
    /// replica's own host), recorded in the history; its request id and
    /// history index.
    fn request(&mut self, i: usize, client: usize, key: Vec<u8>, op: Operation) -> (u64, usize) {
        let id = self.request_next;
        self.request_next += 1;
        let call = self.tick();
        self.history.push(Record {
            client,
            node: self.nodes[i].id,
            key: key.clone(),
            op: op.clone(),
            call,
            ret: None,
            call_ms: self.now,
            outcome: None,
        });
        self.nodes[i]
            .inbox
            .push(NodeInput::Request(Request { id, key, op }));
        self.schedule_wake(i);
        (id, self.history.len() - 1)
    }

    fn complete(&mut self, h: usize, outcome: Option<Outcome>) {
        let ret = self.tick();
        let waited = self.now - self.history[h].call_ms;
        self.stats.wait_max_ms = self.stats.wait_max_ms.max(waited);
        let record = &mut self.history[h];
        match &outcome {
            Some(Outcome::Done(cur)) | Some(Outcome::Rejected(_, cur)) => {
                record.ret = Some(ret);
                self.stats.ops_done += 1;
                // A write that left the key with a value (a delete of an
                // absent key writes nothing anywhere).
                if matches!(
                    (&record.op, &outcome),
                    (Operation::Command(_), Some(Outcome::Done(c))) if c.value.is_some()
                ) {
                    self.acked.insert(record.key.clone());
                }
                let c = &mut self.clients[record.client];
                c.last_version = c.last_version.max(cur.version);
            }
            Some(Outcome::Failed(_)) => {
                record.ret = Some(ret);
                self.stats.ops_failed += 1;
            }
            None => self.stats.ops_unknown += 1,
        }
        record.outcome = outcome;
        let c = record.client;
        self.clients[c].busy = false;
        let t = self.now + self.rng.range(0, 5);
        self.at(t, Ev::Client(c));
    }

    fn crash(&mut self, i: usize) {
        if self.nodes[i].core.is_none() {
            return;
        }
        self.stats.crashes += 1;
        let node = &mut self.nodes[i];
        node.core = None;
        node.pipeline = pipeline(&self.cfg);
        node.disk.clear();
        node.inbox.clear();
        node.chores.clear();
        node.task = None;
        node.swept = 0;
        node.caught_up = 0;
        node.admitted.clear();
        node.lives += 1;
        node.log.crashed();
        node.following = Following::new(node.following.cannot_run_next);
        let lost: Vec<usize> = std::mem::take(&mut node.requests).into_values().collect();
        let sys: Vec<(u64, (usize, SysCall))> = std::mem::take(&mut node.sys).into_iter().collect();
        for h in lost {
            self.complete(h, None);
        }
        for (id, (h, why)) in sys {
            self.sys_done(i, id, h, why, None);
        }
        // Not while the membership changes: a replica that cannot read one
        // key's record fails that key's sweep read, and the driver waits for
        // it forever (design section 12).
        if self.cfg.corrupt && !self.cfg.reconfigure && !self.corrupted && self.disk_rng.chance(0.1)
        {
            self.corrupt(i);
        }
        // Not while the membership changes either: the replica is refused
        // until it is removed and added again, and the driver waits for it.
        if self.cfg.wipe && !self.cfg.reconfigure && !self.wiped && self.wipe_rng.chance(0.15) {
            self.wipe(i);
        }
        let t = self.now + self.rng.range(20, 800);
        self.at(t, Ev::Restart(i));
    }

    /// Flips one bit of one durable record of a crashed replica: a torn
    /// page or a bad sector found at restart. Only records with a checksum
    /// (formats 2 and 4) qualify, unless the run is planted with unchecked
    /// ones (formats 1 and 3).
    fn corrupt(&mut self, i: usize) {
        let unchecked = self.cfg.unchecked_corruption;
        let keys: Vec<Vec<u8>> = self.nodes[i]
            .durable
            .iter()
            .filter(|(_, rec)| match rec.first() {
                Some(2 | 4) => true,
                Some(1 | 3) => unchecked,
                _ => false,
            })
            .map(|(k, _)| k.clone())
            .collect();
        if keys.is_empty() {
            return;
        }
        let key = &keys[self.disk_rng.range(0, keys.len() as u64 - 1) as usize];
        let rec = self.nodes[i].durable.get_mut(key).expect("listed");
        let at = self.disk_rng.range(0, rec.len() as u64 - 1) as usize;
        rec[at] ^= 1 << self.disk_rng.range(0, 7);
        self.corrupted_keys.insert(key.clone());
        self.corrupted = true;
        self.stats.corruptions += 1;
    }

    /// The daemon's admission of a new directory (`server::admit`): it
    /// starts voting only once every other replica took its hello; one that
    /// knows it by another directory refuses it for good (the daemon exits
    /// and says why); while one is down it waits.
    fn admitted(&mut self, i: usize) -> bool {
        let identity = self.nodes[i].identity;
        let others: Vec<usize> = (0..self.nodes.len())
            .filter(|&j| j != i && !self.nodes[j].off)
            .collect();
        if others
            .iter()
            .any(|&j| self.nodes[j].known.get(&i).is_some_and(|&k| k != identity))
        {
            self.nodes[i].off = true;
            self.stats.refused_admissions += 1;
            return false;
        }
        if others.iter().any(|&j| self.nodes[j].core.is_none()) {
            let t = self.now + 100;
            self.at(t, Ev::Restart(i));
            return false;
        }
        for j in others {
            self.nodes[j].known.insert(i, identity);
        }
        self.nodes[i].pending = false;
        true
    }

    /// Loses the whole data directory of a crashed replica: its records,
    /// its peers' identities and its membership copy. It restarts as
    /// `ballot serve` does on an empty directory: a new identity, an
    /// incarnation drawn at random (below 2^40), the start-up membership.
    fn wipe(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        node.durable.clear();
        node.known.clear();
        node.log.wiped();
        node.identity = self.wipe_rng.next();
        node.incarnation = self.wipe_rng.range(1, 1 << 40);
        node.epoch = 1;
        node.durable_epoch = 1;
        node.pending = true;
        self.wiped = true;
        self.stats.wipes += 1;
    }

    fn restart(&mut self, i: usize) {
        if self.nodes[i].off {
            return;
        }
        if self.nodes[i].pending && !self.cfg.unchecked_identity && !self.admitted(i) {
            return;
        }
        // It starts on its durable copy of the membership record, as the
        // host does.
        let members = self.members_at(self.nodes[i].durable_epoch);
        let first = self.memberships[0].voters.clone();
        let behind = if self.cfg.reconfigure {
            self.now + self.epoch_rng.range(0, 10_000)
        } else {
            0
        };
        if members.epoch < self.latest().epoch {
            self.stats.lagging_restarts += 1;
        }
        let node = &mut self.nodes[i];
        node.epoch = members.epoch;
        node.behind_until = behind;
        node.incarnation += 1;
        node.disk_free_at = 0;
        let config = Config::new(node.id, node.incarnation, first);
        // It starts on the embedded protocol and swaps to the active one
        // once it has read the configuration, as the daemon does.
        let mut core = if self.cfg.activations {
            self.factory.make_running(config, EMBEDDED)
        } else {
            self.factory.make(config)
        };
        if let Err(e) = core.reconfigure(members) {
            self.violations
                .push(format!("replica {} refused its own epoch: {e}", node.id));
        }
        node.core = Some(core);
    }

    fn finish(mut self) -> Report {
        if !self.clients.iter().all(|c| c.remaining == 0 && !c.busy) {
            self.violations
                .push("liveness: clients did not finish".to_string());
        }
        if !self.plan_done() {
            self.violations.push(format!(
                "liveness: the membership changes did not finish (at epoch {}, record version {}, queue {:?}, plan {:?})",
                self.latest().epoch,
                self.record_version,
                self.record.queue,
                self.plan
            ));
        }
        if !self.activations_done() {
            self.violations
                .push("liveness: the activations did not finish".to_string());
        }
        if self.cfg.activations {
            self.check_active_protocol();
        }
        if self.cfg.leases {
            self.check_holds();
        }
        if self.cfg.replay && self.quiet_until.is_some_and(|t| self.now >= t) {
            self.check_converged();
        }
        if self.stats.wait_max_ms > WAIT_MAX_MS {
            self.violations.push(format!(
                "liveness: an operation waited {} ms for its answer (bound {WAIT_MAX_MS} ms)",
                self.stats.wait_max_ms
            ));
        }
        // Without faults every operation succeeds, but for those a swap
        // abandoned.
        if !self.cfg.faults
            && (self.stats.ops_failed > self.stats.abandoned || self.stats.ops_unknown > 0)
        {
            self.violations.push(format!(
                "liveness: {} operations failed and {} were lost without any fault",
                self.stats.ops_failed, self.stats.ops_unknown
            ));
        }
        // Local reads must return a value that was committed at that version.
        for r in &self.history {
            if let (Operation::Read(Consistency::Local), Some(Outcome::Done(cur))) =
                (&r.op, &r.outcome)
            {
                if cur.version > 0 {
                    if let Some(v) = self.chosen.get(&(r.key.clone(), cur.version)) {
                        if *v != cur.value {
                            self.violations.push(format!(
                                "local read returned an uncommitted value at version {}",
                                cur.version
                            ));
                        }
                    }
                }
            }
        }
        // A caller told "rejected", or that its command failed and did not
        // apply, never sees it win: every value the workload writes is
        // unique to its operation.
        let chosen: BTreeSet<(&[u8], &[u8])> = self
            .chosen
            .iter()
            .filter_map(|((k, _), v)| v.as_deref().map(|v| (k.as_slice(), v)))
            .collect();
        for r in &self.history {
            let (Operation::Command(bytes), Some(outcome)) = (&r.op, &r.outcome) else {
                continue;
            };
            // The system records' writers may write the same bytes twice.
            if r.client == usize::MAX {
                continue;
            }
            // Told "rejected", or failed with the promise it did not apply.
            let told = match outcome {
                Outcome::Rejected(rej, _) => rej.code.clone(),
                Outcome::Failed(f) if !f.maybe_applied => format!("{:?}", f.reason),
                _ => continue,
            };
            let value = match Command::decode(split_deadline(bytes).1) {
                Ok(Command::Create(v) | Command::Put(v) | Command::Cas { value: v, .. }) => v,
                _ => continue,
            };
            if chosen.contains(&(r.key.as_slice(), value.as_slice())) {
                self.violations.push(format!(
                    "client {} was told {told} for {}, and that value was chosen",
                    r.client,
                    String::from_utf8_lossy(&value)
                ));
            }
        }
        let system: BTreeSet<Vec<u8>> = self
            .history
            .iter()
            .filter(|r| r.client == usize::MAX)
            .map(|r| r.key.clone())
            .collect();
        let keys: BTreeSet<Vec<u8>> = (0..self.cfg.keys)
            .map(|k| self.key(k))
            .chain(system)
            .collect();
        for key in keys {
            let ops: Vec<check::Op> = self
                .history
                .iter()
                .filter(|r| r.key == key)
                .filter_map(to_check_op)
                .collect();
            if let Err(e) = check::check(&ops) {
                self.violations
                    .push(format!("key {}: {e}", String::from_utf8_lossy(&key)));
            }
        }
        Report {
            history: self.history,
            violations: self.violations,
            stats: self.stats,
        }
    }
}

/// Maps a recorded operation to the checker's terms; `None` for operations
/// outside the check (local reads, failures that certainly did not apply).
fn to_check_op(r: &Record) -> Option<check::Op> {
    let input = match &r.op {
        Operation::Read(Consistency::Local) => return None,
        Operation::Read(Consistency::Linearizable) => Input::Read,
        Operation::Command(bytes) => {
            // A command refused for its deadline changed nothing and saw the
            // value it names, evaluated linearizably: a read.
            if let Some(Outcome::Rejected(rej, c)) = &r.outcome {
                if rej.code == "expired" {
                    return Some(check::Op {
                        input: Input::Read,
                        output: Output::Done(c.value.clone(), c.version),
                        call: r.call,
                        ret: r.ret,
                    });
                }
            }
            let (_, bytes) = split_deadline(bytes);
            match Command::decode(bytes).expect("the sim encodes valid commands") {
                Command::Create(v) => Input::Create(v),
                Command::Put(v) => Input::Put(v),
                Command::Cas { expected, value } => Input::Cas(expected, value),
                Command::Delete => Input::Delete,
                Command::DeleteIf { expected } => Input::DeleteIf(expected),
            }
        }
    };
    let (output, ret) = match &r.outcome {
        Some(Outcome::Done(c)) => (Output::Done(c.value.clone(), c.version), r.ret),
        Some(Outcome::Rejected(rej, c)) => (
            Output::Rejected(rej.code.clone(), c.value.clone(), c.version),
            r.ret,
        ),
        Some(Outcome::Failed(f)) if !f.maybe_applied => return None,
        Some(Outcome::Failed(_)) | None => (Output::Unknown, None),
    };
    if matches!(input, Input::Read) && output == Output::Unknown {
        return None;
    }
    Some(check::Op {
        input,
        output,
        call: r.call,
        ret,
    })
}

/// Runs one seed.
pub fn run(cfg: SimConfig, factory: &dyn CoreFactory) -> Report {
    Sim::new(cfg, factory).run()
}
