//! `transaction`: every action checked first (all or nothing), bitmap actions and
//! backups started at one instant under one drain, `completion-mode` individual or
//! grouped.

use super::Daemon;
use super::job_commands::parse_backup;
use crate::error::QmpError;
use crate::error::Reply;
use block::qapi::Members;
use serde_json::Value;
use serde_json::json;
use std::sync::Arc;
use std::sync::Mutex;

impl Daemon {
    pub(super) async fn transaction(&self, mut m: Members) -> Reply {
        let actions = m.required("actions", |m, k, v| match v {
            Value::Array(items) => Ok(items),
            _ => Err(m.type_error(k, "array")),
        })?;
        let grouped = match m.optional("properties", Members::object)? {
            Some(mut p) => {
                let mode = p.optional("completion-mode", |m, k, v| {
                    m.enumeration(k, v, &["individual", "grouped"])
                })?;
                p.finish()?;
                mode.as_deref() == Some("grouped")
            }
            None => false,
        };
        m.finish()?;
        let mut requests = Vec::with_capacity(actions.len());
        let mut bitmap_actions = Vec::new();
        for (i, action) in actions.into_iter().enumerate() {
            let Value::Object(map) = action else {
                return Err(QmpError::generic(format!(
                    "Invalid parameter type for 'actions[{i}]', expected: object"
                )));
            };
            let mut a = Members::new(map, format!("actions[{i}]."));
            let kind = a.required("type", Members::string)?;
            let is_bitmap = crate::daemon::bitmaps::COMMANDS.contains(&kind.as_str());
            if kind != "blockdev-backup" && !is_bitmap {
                return Err(QmpError::generic(format!(
                    "Transaction action '{kind}' is not supported by stillpoint yet \
                     (blockdev-backup and block-dirty-bitmap-* are)"
                )));
            }
            let data = a.required("data", Members::object)?;
            a.finish()?;
            if is_bitmap {
                bitmap_actions.push(crate::daemon::bitmaps::parse(&kind, data)?);
            } else {
                requests.push(parse_backup(data)?);
            }
        }
        // Bitmap actions alone are applied in order, all or nothing. With backups,
        // bitmap changes happen at the backups' instant, under the same drain (see the
        // bitmaps module): adds and removes now (adds are cleared again at the
        // instant); clear, enable, disable and merge checked now and applied then.
        let deferred = |action: &crate::daemon::bitmaps::BitmapAction| {
            !requests.is_empty() && action.waits_for_instant()
        };
        let mut undos = Vec::new();
        let rollback = |undos: Vec<crate::daemon::bitmaps::Undo>| {
            for u in undos.into_iter().rev() {
                crate::daemon::bitmaps::undo(&self.graph, u);
            }
        };
        for action in &bitmap_actions {
            let checked = if deferred(action) {
                crate::daemon::bitmaps::check(&self.graph, action)
            } else {
                crate::daemon::bitmaps::apply(&self.graph, action).map(|u| undos.push(u))
            };
            if let Err(e) = checked {
                rollback(undos);
                return Err(e);
            }
        }
        if requests.is_empty() {
            return Ok(json!({}));
        }
        let at_instant_undos = Arc::new(Mutex::new(Vec::new()));
        let at_instant: block::graph::AtInstant = {
            let graph = self.graph.clone();
            let undos = at_instant_undos.clone();
            Box::new(move || {
                for action in &bitmap_actions {
                    let applied = if action.waits_for_instant() {
                        crate::daemon::bitmaps::apply(&graph, action)
                            .map(|u| undos.lock().unwrap_or_else(|e| e.into_inner()).push(u))
                    } else {
                        crate::daemon::bitmaps::start_at_instant(&graph, action)
                    };
                    applied.map_err(|e| block::Error::invalid(e.desc))?;
                }
                Ok(())
            })
        };
        // Grouped completion: the jobs finish together or not at all.
        let group = grouped.then(jobs::CompletionGroup::new);
        let started = jobs::start_backups_at(
            &self.graph,
            &self.jobs,
            requests,
            Some(at_instant),
            group.as_ref(),
        )
        .await;
        if let Err(e) = started {
            let applied =
                std::mem::take(&mut *at_instant_undos.lock().unwrap_or_else(|e| e.into_inner()));
            rollback(undos.into_iter().chain(applied).collect());
            return Err(e.into());
        }
        Ok(json!({}))
    }
}
