//! Laws of mutual-core's value types, checked on random inputs: hybrid logical clocks,
//! fencing tokens, ids, job request validation, and the automerge encoding of a job view
//! (encode → decode and save → load give back exactly the view).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use mutual_core::BlobRef;
use mutual_core::derive::{derive_state, result_counts};
use mutual_core::doc::JobDoc;
use mutual_core::hlc::{COUNTER_BITS, Hlc, HlcClock};
use mutual_core::ids::{JobId, NodeId};
use mutual_core::invariants::check_clock_bound;
use mutual_core::spec::{
    JobRequest, JobSpec, MAX_ATTEMPTS_LIMIT, MAX_COMMAND_ARGS, MAX_CPU_MILLIS, MAX_GPUS,
    MAX_INPUTS, MAX_LABELS, MAX_MEMORY_BYTES, MAX_NAME_LEN, MAX_REQUEST_BYTES, MAX_TIMEOUT_MS,
    PRIORITY_RANGE, Resources, check_name,
};
use mutual_core::token::{Epoch, FencingToken, unfenced_by};
use mutual_core::view::{
    CheckpointRec, ExecMetrics, ExpiryReason, ExpiryRec, JobView, Outcome, Record, ResultRec,
};
use proptest::collection::{btree_map, btree_set, vec};
use proptest::prelude::*;

/// Physical times stay below `uhlc`'s NTP64 range (2^32 seconds, the year 2106):
/// `Hlc::from_millis` asserts on larger values.
const MAX_PHYS_MS: u64 = 4_000_000_000_000;

// ---------------------------------------------------------------------------------------
// Hybrid logical clocks
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum ClockOp {
    /// Read the clock at a physical time `delta` ms from the previous one (may go back).
    Now(i64),
    /// Observe a remote timestamp `ahead_ms` ahead of physical time (negative: behind),
    /// plus a logical counter.
    Observe {
        delta: i64,
        ahead_ms: i64,
        counter: u64,
    },
    /// A wild physical time anywhere in range.
    Jump(u64),
}

fn clock_op() -> impl Strategy<Value = ClockOp> {
    prop_oneof![
        4 => (-2_000i64..2_000).prop_map(ClockOp::Now),
        4 => (-2_000i64..2_000, -5_000i64..5_000, 0u64..16).prop_map(|(delta, ahead_ms, counter)| {
            ClockOp::Observe { delta, ahead_ms, counter }
        }),
        1 => (0u64..MAX_PHYS_MS).prop_map(ClockOp::Jump),
    ]
}

fn shift(phys: u64, delta: i64) -> u64 {
    phys.saturating_add_signed(delta).min(MAX_PHYS_MS)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// `now()` is strictly increasing whatever physical time does (including going back),
    /// never behind physical time, and `observe()` either merges (every later `now()` is
    /// greater than the remote stamp) or refuses and leaves the clock untouched.
    #[test]
    fn hlc_is_monotone_and_bounded(
        start in 0u64..MAX_PHYS_MS,
        drift in 1u64..5_000,
        ops in vec(clock_op(), 1..80),
    ) {
        let mut clock = HlcClock::new(drift);
        let mut phys = start;
        let mut last = clock.last();
        for op in ops {
            match op {
                ClockOp::Now(delta) => {
                    phys = shift(phys, delta);
                    let t = clock.now(phys);
                    prop_assert!(t > last, "now({phys}) = {t:?} not above {last:?}");
                    prop_assert!(t >= Hlc::from_millis(phys), "{t:?} behind physical {phys}");
                    prop_assert_eq!(clock.last(), t);
                    last = t;
                }
                ClockOp::Jump(p) => {
                    phys = p;
                    let t = clock.now(phys);
                    prop_assert!(t > last);
                    prop_assert!(t >= Hlc::from_millis(phys));
                    last = t;
                }
                ClockOp::Observe { delta, ahead_ms, counter } => {
                    phys = shift(phys, delta);
                    let remote_ms = shift(phys, ahead_ms);
                    let remote = Hlc(Hlc::from_millis(remote_ms).0 | counter);
                    let before = clock.clone();
                    let ahead = remote_ms.saturating_sub(phys);
                    match clock.observe(remote, phys) {
                        Ok(()) => {
                            prop_assert!(ahead <= drift, "accepted {ahead} ms ahead, bound {drift}");
                            prop_assert!(clock.last() >= last, "observe moved the clock back");
                            prop_assert!(clock.last() >= remote);
                            // What the clock accepts, the invariant-8 checker accepts too.
                            prop_assert!(check_clock_bound(JobId::default(), remote, phys, drift).is_ok());
                            let t = clock.now(phys);
                            prop_assert!(t > remote, "now() {t:?} not above observed {remote:?}");
                            prop_assert!(t > last);
                            last = t;
                        }
                        Err(e) => {
                            prop_assert!(ahead >= drift, "refused {ahead} ms ahead, bound {drift}");
                            prop_assert_eq!(&clock, &before, "a refused stamp changed the clock");
                            prop_assert_eq!(e.max_drift_ms, drift);
                            prop_assert_eq!(e.local_ms, phys);
                            prop_assert_eq!(e.ahead_ms, ahead);
                        }
                    }
                    // Strictly inside the bound is always accepted; strictly beyond never.
                    if ahead < drift {
                        prop_assert_eq!(before.clone().observe(remote, phys), Ok(()));
                    }
                    if ahead > drift {
                        prop_assert!(before.clone().observe(remote, phys).is_err());
                        prop_assert!(
                            check_clock_bound(JobId::default(), remote, phys, drift).is_err(),
                            "the checker must flag what the clock refuses by a whole ms"
                        );
                    }
                }
            }
        }
    }

    /// Timestamps built from whole milliseconds round-trip through `as_millis`, and the
    /// counter bits never change the millisecond reading.
    #[test]
    fn hlc_millis_round_trip(ms in 0u64..MAX_PHYS_MS, counter in 0u64..(1 << COUNTER_BITS)) {
        let h = Hlc::from_millis(ms);
        prop_assert_eq!(h.as_millis(), ms);
        prop_assert_eq!(Hlc(h.0 | counter).as_millis(), ms);
        prop_assert_eq!(h.0 & ((1 << COUNTER_BITS) - 1), 0);
        if ms > 0 {
            prop_assert!(Hlc::from_millis(ms - 1) < h);
        }
    }
}

#[test]
fn hlc_drift_bound_edges() {
    let mut c = HlcClock::new(100);
    let t0 = c.now(10_000);
    // 101 ms ahead: refused, clock unchanged.
    let before = c.clone();
    assert!(c.observe(Hlc::from_millis(10_101), 10_000).is_err());
    assert_eq!(c, before);
    assert_eq!(c.last(), t0);
    // 99 ms ahead (with a full counter): merged.
    let remote = Hlc(Hlc::from_millis(10_099).0 | 0xf);
    c.observe(remote, 10_000).expect("within the bound");
    assert!(c.now(10_000) > remote);
    // Far behind: merged, no effect on ordering.
    c.observe(Hlc::from_millis(1), 10_000)
        .expect("past stamps are fine");
    assert!(
        c.now(9_000) > remote,
        "physical time going back never moves the clock back"
    );
}

// ---------------------------------------------------------------------------------------
// Ids and fencing tokens
// ---------------------------------------------------------------------------------------

fn arb_node_id() -> impl Strategy<Value = NodeId> {
    prop_oneof![
        (0u64..6).prop_map(NodeId::from_index),
        any::<[u8; 32]>().prop_map(NodeId),
    ]
}

fn arb_token() -> impl Strategy<Value = FencingToken> {
    (
        prop_oneof![0u32..5, any::<u32>()],
        prop_oneof![0u64..5, any::<u64>()],
        arb_node_id(),
    )
        .prop_map(|(e, h, node)| FencingToken {
            epoch: Epoch(e),
            hlc: Hlc(h),
            node,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Token order is total and epoch-first: a later epoch's token is above any earlier
    /// epoch's, whatever their HLCs; within an epoch, `(hlc, node)` decides.
    #[test]
    fn token_order_is_total_and_epoch_first(a in arb_token(), b in arb_token(), c in arb_token()) {
        use std::cmp::Ordering;
        let ab = a.cmp(&b);
        prop_assert_eq!(ab, b.cmp(&a).reverse());
        prop_assert_eq!(ab == Ordering::Equal, a == b);
        if a.epoch != b.epoch {
            prop_assert_eq!(ab, a.epoch.cmp(&b.epoch), "HLC must not override the epoch");
        } else {
            prop_assert_eq!(ab, (a.hlc, a.node).cmp(&(b.hlc, b.node)));
        }
        // Transitivity.
        if a <= b && b <= c {
            prop_assert!(a <= c);
        }
        // A later epoch's token with the smallest possible HLC still beats this one.
        if a.epoch.0 < u32::MAX {
            let later = FencingToken { epoch: a.epoch.next(), hlc: Hlc(0), node: NodeId([0; 32]) };
            prop_assert!(later > a);
        }
    }

    #[test]
    fn token_text_round_trip(t in arb_token()) {
        let text = t.to_string();
        prop_assert_eq!(text.parse::<FencingToken>(), Ok(t));
    }

    /// Parsing arbitrary text never panics; what parses re-prints to text that parses to
    /// the same token.
    #[test]
    fn token_parse_never_panics(s in prop_oneof![
        ".*",
        "[0-9]{1,12}\\.[0-9]{1,22}\\.[0-9a-fA-F]{60,68}",
        "[0-9+-]{0,4}\\.[0-9]{0,3}\\..{0,70}",
    ]) {
        if let Ok(t) = s.parse::<FencingToken>() {
            prop_assert_eq!(t.to_string().parse::<FencingToken>(), Ok(t));
        }
    }

    /// The counted rule: a writer is unfenced by `seen` iff `seen` holds no later epoch and
    /// nothing smaller in its own epoch; more knowledge can only fence, never unfence.
    #[test]
    fn unfenced_by_law(t in arb_token(), seen in btree_set(arb_token(), 0..6), more in arb_token()) {
        let expected = seen.iter().all(|s| s.epoch <= t.epoch)
            && seen.iter().filter(|s| s.epoch == t.epoch).all(|s| *s >= t);
        prop_assert_eq!(unfenced_by(&t, seen.iter()), expected);
        let mut bigger = seen.clone();
        bigger.insert(more);
        if unfenced_by(&t, bigger.iter()) {
            prop_assert!(unfenced_by(&t, seen.iter()));
        }
        // Seeing oneself never fences.
        prop_assert!(unfenced_by(&t, [t].iter()));
    }

    /// The engine's fence (`JobView::fences`) and the counted rule agree: a holder is fenced
    /// by its view exactly when a result it wrote with `seen = claims_from(epoch)` would not
    /// count.
    #[test]
    fn view_fence_matches_counted_rule(
        claims in vec((1u32..5, 0u64..4, 1u64..40), 0..10),
        holder in (1u32..5, 0u64..4, 1u64..40),
    ) {
        let mut view = JobView::default();
        for (e, n, h) in claims {
            view.insert(Record::Claim { epoch: Epoch(e), node: NodeId::from_index(n), hlc: Hlc(h) });
        }
        let t = FencingToken { epoch: Epoch(holder.0), hlc: Hlc(holder.2), node: NodeId::from_index(holder.1) };
        let seen = view.claims_from(t.epoch);
        prop_assert!(seen.iter().all(|s| s.epoch >= t.epoch));
        prop_assert_eq!(view.fences(&t), !unfenced_by(&t, seen.iter()));
        let rec = ResultRec {
            claim_hlc: t.hlc,
            outcome: Outcome { exit_code: 0, timed_out: false },
            outputs: None,
            logs: None,
            metrics: ExecMetrics::default(),
            hlc: Hlc(100),
            seen,
        };
        prop_assert_eq!(result_counts(t.epoch, t.node, &rec), !view.fences(&t));
    }

    #[test]
    fn node_id_hex_round_trip(bytes in any::<[u8; 32]>()) {
        let id = NodeId(bytes);
        let text = id.to_string();
        prop_assert_eq!(text.len(), 64);
        prop_assert_eq!(text.parse::<NodeId>(), Ok(id));
        prop_assert_eq!(text.to_uppercase().parse::<NodeId>(), Ok(id));
        let json = serde_json::to_string(&id).expect("serialize");
        prop_assert_eq!(serde_json::from_str::<NodeId>(&json).expect("deserialize"), id);
    }

    #[test]
    fn job_id_hex_round_trip(bytes in any::<[u8; 16]>()) {
        let id = JobId(bytes);
        let text = id.to_string();
        prop_assert_eq!(text.len(), 32);
        prop_assert_eq!(text.parse::<JobId>(), Ok(id));
        prop_assert_eq!(text.to_uppercase().parse::<JobId>(), Ok(id));
        // A job id is never a node id and vice versa (lengths differ).
        prop_assert!(text.parse::<NodeId>().is_err());
    }

    /// Bad text never panics (multi-byte characters included) and whatever parses is the
    /// lowercase form of the input.
    #[test]
    fn id_parse_never_panics(s in prop_oneof![
        ".*",
        "[0-9a-fA-F]{30,34}",
        "[0-9a-fA-F]{62,66}",
        "[0-9a-fé€g]{16,40}",
        "\\PC{32}",
    ]) {
        if let Ok(id) = s.parse::<NodeId>() {
            prop_assert_eq!(id.to_string(), s.to_lowercase());
        }
        if let Ok(id) = s.parse::<JobId>() {
            prop_assert_eq!(id.to_string(), s.to_lowercase());
        }
        let _ = serde_json::from_str::<NodeId>(&format!("{s:?}"));
    }
}

// ---------------------------------------------------------------------------------------
// Job requests
// ---------------------------------------------------------------------------------------

fn arb_text(max: usize) -> impl Strategy<Value = String> {
    prop_oneof![
        3 => proptest::string::string_regex(&format!("[a-zA-Z0-9._-]{{0,{max}}}")).expect("regex"),
        2 => ".*",
        1 => "[A-Z_][A-Z0-9_]{0,10}",
        1 => Just("MUTUAL_X".to_string()),
        1 => "[ \t\0a-z]{0,5}",
    ]
}

fn arb_request() -> impl Strategy<Value = JobRequest> {
    let resources = proptest::option::of(
        (
            prop_oneof![0u32..=2_000_000, any::<u32>()],
            prop_oneof![0u64..=(1 << 45), any::<u64>()],
            prop_oneof![0u32..=70, any::<u32>()],
        )
            .prop_map(|(cpu_millis, memory_bytes, gpus)| Resources {
                cpu_millis,
                memory_bytes,
                gpus,
            }),
    );
    let inputs = vec(
        (
            prop_oneof!["[0-9a-f]{64}", "[0-9a-fA-F]{63,65}", ".*",],
            prop_oneof!["[0-9a-f]{144}", ".{0,8}", "[0-9a-f]{257}"],
            any::<u64>(),
            0usize..10,
        )
            .prop_map(|(cid, key, bytes, holders)| BlobRef {
                cid,
                key,
                bytes,
                holders: (0..holders as u64).map(NodeId::from_index).collect(),
            }),
        0..4,
    );
    let command = prop_oneof![
        8 => vec(arb_text(8), 0..5),
        1 => vec(Just("x".to_string()), (MAX_COMMAND_ARGS - 1)..(MAX_COMMAND_ARGS + 2)),
    ];
    (
        (
            proptest::option::of(arb_text(70)),
            proptest::option::of(arb_text(70)),
            command,
            proptest::option::of(prop_oneof![
                "[a-z0-9./:-]{0,20}".boxed(),
                ".*".boxed(),
                "[a-z]{250,260}".boxed(),
            ]),
        ),
        (
            btree_map(arb_text(10), arb_text(10), 0..4),
            resources,
            btree_map(arb_text(70), arb_text(70), 0..4),
            prop_oneof![-1_100i32..=1_100, any::<i32>()],
            proptest::option::of(prop_oneof![0u64..=MAX_TIMEOUT_MS + 1, any::<u64>()]),
            proptest::option::of(prop_oneof![0u32..=MAX_ATTEMPTS_LIMIT + 1, any::<u32>()]),
            inputs,
        ),
    )
        .prop_map(
            |(
                (namespace, name, command, image),
                (env, resources, labels, priority, timeout_ms, max_attempts, inputs),
            )| JobRequest {
                namespace,
                name,
                command,
                image,
                env,
                resources,
                labels,
                priority,
                timeout_ms,
                max_attempts,
                inputs,
                checkpoint_interval_ms: None,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Validation never panics; an accepted spec satisfies every limit and keeps the
    /// request's content; a refusal names a field.
    #[test]
    fn validate_never_panics(req in arb_request(), id in any::<[u8; 16]>(), at in any::<u64>()) {
        let submitter = NodeId::from_index(1);
        match req.clone().validate(JobId(id), Hlc(at), submitter) {
            Ok(spec) => {
                prop_assert!(check_name("namespace", &spec.namespace).is_ok());
                prop_assert!(spec.name.is_empty() || check_name("name", &spec.name).is_ok());
                prop_assert!(!spec.command.is_empty() || spec.image.is_some());
                prop_assert!(spec.command.len() <= MAX_COMMAND_ARGS);
                prop_assert!(spec.command.iter().all(|a| !a.contains('\0')));
                prop_assert!(spec.resources.cpu_millis >= 1 && spec.resources.cpu_millis <= MAX_CPU_MILLIS);
                prop_assert!(spec.resources.memory_bytes >= 1 && spec.resources.memory_bytes <= MAX_MEMORY_BYTES);
                prop_assert!(spec.resources.gpus <= MAX_GPUS);
                prop_assert!(spec.labels.len() <= MAX_LABELS);
                prop_assert!(spec.labels.iter().all(|(k, v)| k.len() <= MAX_NAME_LEN && v.len() <= MAX_NAME_LEN));
                prop_assert!(PRIORITY_RANGE.contains(&spec.priority));
                prop_assert!(spec.timeout_ms.is_none_or(|t| (1..=MAX_TIMEOUT_MS).contains(&t)));
                prop_assert!((1..=MAX_ATTEMPTS_LIMIT).contains(&spec.max_attempts));
                prop_assert!(spec.inputs.len() <= MAX_INPUTS);
                prop_assert!(spec.inputs.iter().all(|i| i.check().is_ok()));
                prop_assert!(spec.env.keys().all(|k| !k.starts_with("MUTUAL_")));
                prop_assert_eq!(&spec.command, &req.command);
                prop_assert_eq!(&spec.env, &req.env);
                prop_assert_eq!(spec.id, JobId(id));
                prop_assert_eq!(spec.submitted_at, Hlc(at));
                prop_assert_eq!(spec.submitter, submitter);
                // The stored form round-trips.
                let json = serde_json::to_string(&spec).expect("serialize spec");
                prop_assert_eq!(serde_json::from_str::<JobSpec>(&json).expect("parse spec"), spec);
            }
            Err(e) => {
                prop_assert!(!e.field.is_empty());
                prop_assert!(!e.problem.is_empty());
            }
        }
        // The request's JSON form parses back to the same request.
        let body = serde_json::to_vec(&req).expect("serialize request");
        if body.len() <= MAX_REQUEST_BYTES {
            prop_assert_eq!(JobRequest::from_json(&body).expect("own JSON parses"), req);
        } else {
            prop_assert_eq!(JobRequest::from_json(&body).expect_err("too big").field, "(body)");
        }
    }

    /// Parsing arbitrary bytes never panics, and whatever parses also validates without
    /// panicking.
    #[test]
    fn from_json_never_panics(body in prop_oneof![
        vec(any::<u8>(), 0..200),
        ".*".prop_map(String::into_bytes),
        r#"\{"(command|image|env|resources|priority|max_attempts|timeout_ms|inputs|labels|name)":.{0,40}\}"#
            .prop_map(String::into_bytes),
        Just(b"[".repeat(10_000)),
        Just(format!("{}{}", "{\"env\":".repeat(200), "1")).prop_map(String::into_bytes),
    ]) {
        match JobRequest::from_json(&body) {
            Ok(req) => {
                let _ = req.validate(JobId::default(), Hlc(1), NodeId::default());
            }
            Err(e) => prop_assert_eq!(e.field, "(body)"),
        }
    }
}

#[test]
fn from_json_refuses_oversized_bodies() {
    let mut body = br#"{"command":["x"],"name":""#.to_vec();
    body.extend(std::iter::repeat_n(b'a', MAX_REQUEST_BYTES));
    body.extend(br#""}"#);
    let e = JobRequest::from_json(&body).expect_err("over the limit");
    assert_eq!(e.field, "(body)");
    assert!(e.problem.contains("limit"), "{e}");
}

// ---------------------------------------------------------------------------------------
// Document encoding
// ---------------------------------------------------------------------------------------

fn arb_small_node() -> impl Strategy<Value = NodeId> {
    (0u64..4).prop_map(NodeId::from_index)
}

fn arb_epoch() -> impl Strategy<Value = Epoch> {
    prop_oneof![8 => 1u32..6, 1 => any::<u32>()].prop_map(Epoch)
}

fn arb_hlc() -> impl Strategy<Value = Hlc> {
    prop_oneof![
        4 => (0u64..1_000_000).prop_map(Hlc),
        1 => any::<u64>().prop_map(Hlc),
        1 => Just(Hlc(u64::MAX)),
    ]
}

fn arb_seen() -> impl Strategy<Value = BTreeSet<FencingToken>> {
    btree_set(
        (arb_epoch(), arb_hlc(), arb_small_node()).prop_map(|(epoch, hlc, node)| FencingToken {
            epoch,
            hlc,
            node,
        }),
        0..4,
    )
}

fn arb_cid() -> impl Strategy<Value = BlobRef> {
    (
        prop_oneof!["[0-9a-f]{64}", ".*", Just(String::new())],
        any::<u64>(),
    )
        .prop_map(|(cid, bytes)| BlobRef {
            bytes,
            ..common::blob(&cid)
        })
}

fn arb_record() -> impl Strategy<Value = Record> {
    let reason = prop_oneof![
        Just(ExpiryReason::Failed),
        Just(ExpiryReason::HolderDead),
        Just(ExpiryReason::GaveUp),
    ];
    let metrics = (
        any::<u64>(),
        any::<u32>(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(
            |(wall_ms, cpu_avg_millis, memory_peak_bytes, bytes_in, bytes_out)| ExecMetrics {
                wall_ms,
                cpu_avg_millis,
                memory_peak_bytes,
                bytes_in,
                bytes_out,
            },
        );
    prop_oneof![
        3 => (arb_epoch(), arb_small_node(), arb_hlc())
            .prop_map(|(epoch, node, hlc)| Record::Claim { epoch, node, hlc }),
        1 => (arb_epoch(), arb_small_node(), arb_hlc())
            .prop_map(|(epoch, node, hlc)| Record::Start { epoch, node, hlc }),
        2 => (arb_epoch(), arb_small_node(), arb_hlc(), reason)
            .prop_map(|(epoch, observer, hlc, reason)| Record::Expiry {
                epoch,
                observer,
                rec: ExpiryRec { hlc, reason },
            }),
        2 => (arb_epoch(), arb_small_node(), prop_oneof![0u64..4, any::<u64>()], arb_hlc(), arb_cid(), arb_hlc(), arb_seen())
            .prop_map(|(epoch, node, seq, claim_hlc, cid, hlc, seen)| Record::Checkpoint {
                epoch,
                node,
                seq,
                rec: Arc::new(CheckpointRec { claim_hlc, blob: cid, hlc, seen }),
            }),
        2 => (
            (arb_epoch(), arb_small_node(), arb_hlc(), any::<i32>(), any::<bool>()),
            (proptest::option::of(arb_cid()), proptest::option::of(arb_cid()), metrics, arb_hlc(), arb_seen()),
        )
            .prop_map(|((epoch, node, claim_hlc, exit_code, timed_out), (outputs, logs, metrics, hlc, seen))| {
                Record::Result {
                    epoch,
                    node,
                    rec: Arc::new(ResultRec {
                        claim_hlc,
                        outcome: Outcome { exit_code, timed_out },
                        outputs,
                        logs,
                        metrics,
                        hlc,
                        seen,
                    }),
                }
            }),
        1 => (arb_small_node(), arb_hlc()).prop_map(|(node, hlc)| Record::Cancel { node, hlc }),
    ]
}

fn arb_spec() -> impl Strategy<Value = JobSpec> {
    (
        any::<[u8; 16]>(),
        ".{0,12}",
        vec(".{0,8}", 0..3),
        proptest::option::of(".{0,12}"),
        btree_map(".{0,6}", ".{0,6}", 0..3),
        any::<i32>(),
        proptest::option::of(any::<u64>()),
        1u32..=5,
        arb_hlc(),
    )
        .prop_map(
            |(id, name, command, image, env, priority, timeout_ms, max_attempts, submitted_at)| {
                JobSpec {
                    id: JobId(id),
                    namespace: "default".into(),
                    name,
                    command,
                    image,
                    env,
                    resources: Resources::default(),
                    labels: BTreeMap::new(),
                    priority,
                    timeout_ms,
                    max_attempts,
                    inputs: Vec::new(),
                    checkpoint_interval_ms: None,
                    submitted_at,
                    submitter: NodeId::from_index(0),
                }
            },
        )
}

proptest! {
    // Every record is one automerge change: keep the case count modest.
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Writing every record of a view into a job document and decoding it gives back the
    /// view exactly; so does save → load; writing a record twice is a no-op.
    #[test]
    fn doc_encode_decode_round_trip(spec in arb_spec(), records in vec(arb_record(), 0..24)) {
        let creator = NodeId::from_index(0);
        let mut view = JobView::default();
        view.insert(Record::Spec(Arc::new(spec.clone())));
        for r in records {
            view.insert(r);
        }
        let mut doc = JobDoc::create(&spec, creator).expect("create");
        for r in view.records().skip(1) {
            doc.write(&r).expect("write");
        }
        let decoded = doc.view().expect("decode");
        prop_assert_eq!(&decoded, &view);
        prop_assert_eq!(doc.job_id().expect("job id"), spec.id);
        prop_assert_eq!(derive_state(&decoded), derive_state(&view));

        let bytes = doc.save();
        let mut loaded = JobDoc::load(&bytes, NodeId::from_index(1)).expect("load");
        prop_assert_eq!(&loaded.view().expect("decode loaded"), &view);

        // Retries are harmless: rewriting every record changes nothing.
        let len_before = loaded.save().len();
        for r in view.records().skip(1) {
            loaded.write(&r).expect("rewrite");
        }
        prop_assert_eq!(&loaded.view().expect("decode"), &view);
        prop_assert_eq!(loaded.save().len(), len_before, "a duplicate write added a change");

        // The spec is written only at creation.
        prop_assert!(loaded.write(&Record::Spec(Arc::new(spec))).is_err());
    }

    /// Garbage bytes never panic the loader.
    #[test]
    fn doc_load_never_panics(bytes in vec(any::<u8>(), 0..256)) {
        if let Ok(doc) = JobDoc::load(&bytes, NodeId::from_index(0)) {
            let _ = doc.view();
        }
    }
}

#[test]
fn view_insert_keeps_the_smaller_of_two_values() {
    use mutual_core::view::Inserted;
    let n = NodeId::from_index(3);
    let big = Record::Claim {
        epoch: Epoch(1),
        node: n,
        hlc: Hlc(20),
    };
    let small = Record::Claim {
        epoch: Epoch(1),
        node: n,
        hlc: Hlc(10),
    };
    for order in [[&big, &small], [&small, &big]] {
        let mut v = JobView::default();
        assert_eq!(v.insert(order[0].clone()), Inserted::New);
        assert_eq!(v.insert(order[0].clone()), Inserted::Duplicate);
        assert_eq!(v.insert(order[1].clone()), Inserted::Conflict);
        assert!(v.contains(&small) && !v.contains(&big));
        assert_eq!(v.len(), 1);
    }
}
