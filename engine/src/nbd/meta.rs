//! Metadata context negotiation (NBD_OPT_LIST_META_CONTEXT, NBD_OPT_SET_META_CONTEXT) over the
//! contexts an export offers, as the NBD protocol document has it:
//!
//! - a listing with no query lists every context; a query ending in a colon (`base:`, `qemu:`,
//!   `qemu:dirty-bitmap:`) lists every context whose name starts with it; any other query lists
//!   the context of exactly that name;
//! - a selection selects the contexts named exactly (a namespace alone, `base:`, selects
//!   nothing), each with a unique id; it replaces the previous selection, even when it fails,
//!   and holds only if the client then enters transmission with the same export;
//! - queries naming nothing the export offers (unknown namespaces, unknown leaf names) are
//!   skipped silently; malformed option data gets NBD_REP_ERR_INVALID and the negotiation
//!   goes on.

use std::io::Write;
use std::sync::Arc;

use drivers::nbd::proto::{self, opt, rep, MetaContextRequest};

use super::{select, NbdServer};
use crate::export::{Address, Export, MetaContext};

/// Contexts selected for transmission, each with its id.
pub type Selected = Vec<(u32, Arc<dyn MetaContext>)>;

/// A selection and the export it was made for.
pub struct Selection {
    export: Arc<Export>,
    contexts: Selected,
}

/// What a selection means for the export the client entered transmission with: its contexts
/// if it was made for that export, none otherwise.
pub fn selected_for(selection: Option<Selection>, export: &Arc<Export>) -> Selected {
    match selection {
        Some(s) if Arc::ptr_eq(&s.export, export) => s.contexts,
        _ => Selected::new(),
    }
}

fn listed_by(name: &str, query: &str) -> bool {
    if query.ends_with(':') {
        name.starts_with(query)
    } else {
        name == query
    }
}

/// The contexts a listing with `queries` names.
pub fn listed<'a>(
    contexts: &'a [Arc<dyn MetaContext>],
    queries: &[String],
) -> Vec<&'a Arc<dyn MetaContext>> {
    contexts
        .iter()
        .filter(|c| queries.is_empty() || queries.iter().any(|q| listed_by(c.name(), q)))
        .collect()
}

/// The contexts a selection with `queries` names, each once, with its id: its place in the
/// export's list, from 1.
pub fn selected(contexts: &[Arc<dyn MetaContext>], queries: &[String]) -> Selected {
    contexts
        .iter()
        .zip(1u32..)
        .filter(|(c, _)| queries.iter().any(|q| q == c.name()))
        .map(|(c, id)| (id, Arc::clone(c)))
        .collect()
}

/// Answers NBD_OPT_LIST_META_CONTEXT or NBD_OPT_SET_META_CONTEXT (`option`, with `data`) for
/// the exports of `server` at `address`; a selection replaces `selection`.
pub fn negotiate<S: Write>(
    s: &mut S,
    server: &NbdServer,
    address: &Address,
    option: u32,
    data: &[u8],
    structured: bool,
    selection: &mut Option<Selection>,
) -> std::io::Result<()> {
    let set = option == opt::SET_META_CONTEXT;
    if set {
        *selection = None;
    }
    let mut reply =
        |kind: u32, payload: &[u8]| s.write_all(&proto::option_reply(option, kind, payload));
    if !structured {
        return reply(rep::ERR_INVALID, b"negotiate structured replies first");
    }
    let req = match MetaContextRequest::parse(data) {
        Ok(r) => r,
        Err(e) => return reply(rep::ERR_INVALID, e.to_string().as_bytes()),
    };
    let Some(export) = select(server, address, &req.export) else {
        let msg = format!("no export named '{}'", req.export);
        return reply(rep::ERR_UNKNOWN, msg.as_bytes());
    };
    if set {
        let contexts = selected(&export.offered_contexts(), &req.queries);
        for (id, c) in &contexts {
            reply(rep::META_CONTEXT, &proto::meta_context_reply(*id, c.name()))?;
        }
        *selection = Some(Selection { export, contexts });
    } else {
        for c in listed(&export.offered_contexts(), &req.queries) {
            // Listing ids are reserved: 0.
            reply(rep::META_CONTEXT, &proto::meta_context_reply(0, c.name()))?;
        }
    }
    reply(rep::ACK, &[])
}

#[cfg(test)]
mod tests {
    use super::*;
    use drivers::IoError;

    struct Named(&'static str);

    impl MetaContext for Named {
        fn name(&self) -> &str {
            self.0
        }
        fn status(&self, _: u64, len: u32, out: &mut Vec<(u32, u32)>) -> Result<(), IoError> {
            out.push((len, 0));
            Ok(())
        }
    }

    fn offered() -> Vec<Arc<dyn MetaContext>> {
        vec![
            Arc::new(Named("base:allocation")),
            Arc::new(Named("qemu:dirty-bitmap:monday")),
            Arc::new(Named("qemu:dirty-bitmap:tuesday")),
        ]
    }

    fn q(queries: &[&str]) -> Vec<String> {
        queries.iter().map(|s| s.to_string()).collect()
    }

    fn names<'a>(list: impl IntoIterator<Item = &'a Arc<dyn MetaContext>>) -> Vec<&'a str> {
        list.into_iter().map(|c| c.name()).collect()
    }

    #[test]
    fn listing_matches_names_and_namespace_wildcards() {
        let all = offered();
        assert_eq!(names(listed(&all, &[])).len(), 3);
        assert_eq!(names(listed(&all, &q(&["base:"]))), ["base:allocation"]);
        assert_eq!(
            names(listed(&all, &q(&["base:allocation"]))),
            ["base:allocation"]
        );
        assert_eq!(
            names(listed(&all, &q(&["qemu:dirty-bitmap:"]))),
            ["qemu:dirty-bitmap:monday", "qemu:dirty-bitmap:tuesday"]
        );
        assert_eq!(names(listed(&all, &q(&["qemu:"]))).len(), 2);
        // Unknown namespaces and leaf names list nothing, and are no error.
        assert!(listed(
            &all,
            &q(&["nbd-server:", "base:nothing", "x-other:allocation"])
        )
        .is_empty());
        // Several queries: the union, each context once.
        assert_eq!(
            listed(
                &all,
                &q(&["base:allocation", "base:", "qemu:dirty-bitmap:tuesday"])
            )
            .len(),
            2
        );
    }

    #[test]
    fn selection_takes_exact_names_once_with_unique_ids() {
        let all = offered();
        let chosen = selected(
            &all,
            &q(&[
                "qemu:dirty-bitmap:tuesday",
                "base:allocation",
                "base:allocation",
            ]),
        );
        let got: Vec<(u32, &str)> = chosen.iter().map(|(id, c)| (*id, c.name())).collect();
        assert_eq!(
            got,
            [(1, "base:allocation"), (3, "qemu:dirty-bitmap:tuesday")]
        );
        // A namespace alone selects nothing; neither do unknown names or no query at all.
        assert!(selected(&all, &q(&["base:", "qemu:", "base:other"])).is_empty());
        assert!(selected(&all, &[]).is_empty());
    }
}
