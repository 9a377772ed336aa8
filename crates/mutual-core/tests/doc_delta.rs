//! `JobDoc::records_since` hands a replica exactly what decoding the whole document would
//! add: for any delivery order of concurrent changes from several writers (some waiting
//! for their dependencies, two writers putting different values under one key), the
//! records gathered change by change make the same view as `JobDoc::view` of the result.

mod common;

use common::{cancel, checkpoint, claim, expiry, node, result, spec_at, start, tok};
use mutual_core::doc::JobDoc;
use mutual_core::hlc::Hlc;
use mutual_core::view::{ExpiryReason, JobView, Record};
use proptest::prelude::*;

/// The creator's first change, and the changes of four writers that each loaded the
/// creator's document and wrote a chain of records on top of it (concurrently with each
/// other). Writers 1 and 2 both put a claim under writer 1's key, with different values:
/// the conflict a buggy or hostile peer makes.
fn changes() -> (Vec<u8>, Vec<Vec<u8>>) {
    let spec = spec_at(3, Hlc(10));
    let mut base = JobDoc::create(&spec, node(0)).expect("create");
    let first = base.last_change().expect("first change");
    let saved = base.save();
    let chains: Vec<(u64, Vec<Record>)> = vec![
        (
            1,
            vec![
                claim(1, node(1), 100),
                start(1, node(1), 101),
                checkpoint(1, node(1), 1, 100, "c1", 102, [tok(1, 100, node(1))]),
                result(1, node(1), 100, 0, 103, [tok(1, 100, node(1))]),
            ],
        ),
        (2, vec![claim(1, node(1), 99), claim(1, node(2), 104)]),
        (
            3,
            vec![
                expiry(1, node(3), 105, ExpiryReason::HolderDead),
                claim(2, node(3), 106),
            ],
        ),
        (4, vec![cancel(node(4), 107)]),
    ];
    let mut out = Vec::new();
    for (writer, records) in chains {
        let mut doc = JobDoc::load(&saved, node(writer)).expect("load");
        for r in &records {
            doc.write(r).expect("write");
            out.push(doc.last_change().expect("change"));
        }
    }
    (first, out)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn records_since_adds_what_the_whole_view_adds(
        order in Just((0..9usize).collect::<Vec<_>>()).prop_shuffle(),
        twice in proptest::collection::vec(any::<bool>(), 9),
    ) {
        let (first, changes) = changes();
        prop_assert_eq!(changes.len(), 9);
        let mut replica = JobDoc::empty(node(9));
        replica.apply(&first).expect("creator's change");
        let mut gathered: JobView = replica.view().expect("decodes");
        for (i, &c) in order.iter().enumerate() {
            let before = replica.heads();
            replica.apply(&changes[c]).expect("apply");
            if twice[i] {
                // A duplicate delivery brings nothing.
                replica.apply(&changes[c]).expect("apply again");
            }
            for r in replica.records_since(&before).expect("records") {
                gathered.insert(r);
            }
            prop_assert_eq!(&gathered, &replica.view().expect("decodes"));
        }
        // Everything arrived: every record of every writer, the conflict resolved to the
        // smaller claim as the whole view resolves it.
        let view = replica.view().expect("decodes");
        prop_assert_eq!(view.claims.get(&(mutual_core::token::Epoch(1), node(1))), Some(&Hlc(99)));
        prop_assert_eq!(view.len(), gathered.len());
    }
}

#[test]
fn nothing_new_means_no_records() {
    let (first, changes) = changes();
    let mut replica = JobDoc::empty(node(9));
    replica.apply(&first).expect("creator's change");
    replica.apply(&changes[0]).expect("apply");
    let before = replica.heads();
    replica.apply(&changes[0]).expect("again");
    assert!(replica.records_since(&before).expect("records").is_empty());
    // A change whose dependency has not arrived is held, and brings nothing yet.
    replica.apply(&changes[2]).expect("held");
    assert!(replica.records_since(&before).expect("records").is_empty());
    replica.apply(&changes[1]).expect("its dependency");
    assert_eq!(replica.records_since(&before).expect("records").len(), 2);
}
