//! Verifications: starting one (its staging buffers mapped on this control thread, then the
//! job placed on a reactor next to the pair's copier), listing and cancelling. Their ids come
//! from the backups' sequence, so one id names one job and `quicksplit cancel ID` needs no
//! kind.

use std::sync::{Arc, PoisonError};

use super::{Engine, EngineError};
use crate::pair::{PairError, PairState};
use crate::verify::job::VerifyJob;
use crate::verify::{Verify, VerifyInfo, VerifyParams, VerifyState};

impl Engine {
    /// Starts a verification of a pair in PAIR (or in a forward COPY); returns its id.
    pub fn verify_start(&self, pair: &str, params: VerifyParams) -> Result<u64, EngineError> {
        // Under the lock a pair's deletion takes: a pair being verified is not deleted.
        let _starting = self
            .backup_starts
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let p = self.pair(pair)?;
        let state = p.state();
        let refused = match state {
            PairState::Pair => None,
            PairState::Copy if !p.reversing() => None,
            PairState::Copy => Some("it is restoring P from S; verify it once it is in PAIR"),
            PairState::Psus => Some(
                "a split pair's P and S differ where either changed; resync it, then verify it \
                 in PAIR",
            ),
            PairState::Psue => Some("it is suspended on an error; resync it first"),
        };
        if let Some(why) = refused {
            return Err(PairError::WrongState {
                name: pair.to_string(),
                state: state.as_str(),
                what: format!("only a pair in PAIR (or COPY) can be verified: {why}"),
            }
            .into());
        }
        if let Some(id) = self.verifies.running_for(pair) {
            return Err(EngineError::InUse(format!(
                "verification {id} of pair '{pair}' is running"
            )));
        }
        let pool = VerifyJob::staging_pool(&p).map_err(|e| {
            EngineError::Unavailable(format!(
                "no memory for the verification's staging buffers: {e}"
            ))
        })?;
        let id = self.backups.next_id();
        let verify = Arc::new(Verify::new(
            id,
            pair,
            p.tracks(),
            p.geometry().size(),
            params,
        ));
        self.verifies.add(Arc::clone(&verify));
        // Next to the pair's copier, on another core when there is one.
        let reactor = self.reactors.get(p.copier_reactor_index() + 1).clone();
        let (v, pr) = (Arc::clone(&verify), Arc::clone(&p));
        let sent = reactor.send_blocking(Box::new(move |cx| {
            cx.add_poller(Box::new(VerifyJob::new(v, pr, pool)))
        }));
        if let Err(e) = sent {
            self.verifies.remove(id);
            return Err(e.into());
        }
        tracing::info!(
            verify = id,
            pair,
            repair = params.repair,
            rate = verify.rate,
            "verification started"
        );
        Ok(id)
    }

    /// `verify_get`.
    pub fn verify_get(&self, id: Option<u64>) -> Result<Vec<VerifyInfo>, EngineError> {
        self.verifies.infos(id).ok_or_else(|| {
            EngineError::NotFound(format!("no verification with id {}", id.unwrap_or(0)))
        })
    }

    /// `verify_cancel`: asks a running verification to stop (it ends `cancelled`).
    pub fn verify_cancel(&self, id: u64) -> Result<(), EngineError> {
        let v = self
            .verifies
            .get(id)
            .ok_or_else(|| EngineError::NotFound(format!("no verification with id {id}")))?;
        if v.state() != VerifyState::Running {
            return Err(EngineError::InUse(format!(
                "verification {id} is not running ({:?})",
                v.state()
            )));
        }
        v.cancel();
        for r in self.reactors.handles() {
            r.wake_if_parked();
        }
        Ok(())
    }

    /// The running verification of `pair`, if any.
    pub(crate) fn verify_running_for(&self, pair: &str) -> Option<u64> {
        self.verifies.running_for(pair)
    }
}
