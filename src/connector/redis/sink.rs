//! Writing rows as keys: each request is one pipeline per node (all of it on a standalone
//! server; on a cluster the rows go to their keys' masters, in parallel), sent on one of the
//! node's pooled connections. Per-command errors are read one by one: a refusal (`WRONGTYPE`,
//! a bad score) sends the row to dead letters with Redis's message; `MOVED`, `ASK`, `TRYAGAIN`,
//! `CLUSTERDOWN`, `LOADING` and lost connections send the row again.
//!
//! Hash, string, json, set and zset writes are idempotent (a retried or resumed request writes
//! the same values again). `list` (`RPUSH`) and `stream` (`XADD ... *`) append: a request sent
//! again after a lost answer appends its rows twice (at-least-once); give streams an `_id`
//! column to make `XADD` refuse the repeat instead.

use std::borrow::Cow;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BinaryArray, RecordBatch, StringArray, StructArray};
use arrow::datatypes::{DataType, Field, SchemaRef};
use arrow::json::writer::{EncoderOptions, make_encoder};
use async_trait::async_trait;
use redis::Value;

use super::conn::{Redis, slot, text};
use super::{Kind, Layout, Seg};
use crate::error::{Error, Result};
use crate::sink::{Attempt, Outcome, SinkBackend};

/// Writes a REDIS table.
#[derive(Debug)]
pub struct RedisBackend {
    pub redis: Redis,
    pub layout: Arc<Layout>,
}

/// A pipeline's commands, the row each comes from and the slot of its key.
pub struct RedisRequest {
    cmds: Vec<redis::Cmd>,
    rows: Vec<u32>,
    slots: Vec<u16>,
    bytes: usize,
    /// Rows refused before sending (a NULL key).
    rejected: Vec<(usize, String)>,
}

/// A column as the bytes Redis stores.
enum Text {
    Str(StringArray),
    Bin(BinaryArray),
    /// A list column: its items as text.
    List(arrow::array::ListArray, Box<Text>),
}

impl Text {
    fn of(a: &ArrayRef) -> Result<Text> {
        Ok(match a.data_type() {
            DataType::Binary
            | DataType::LargeBinary
            | DataType::BinaryView
            | DataType::FixedSizeBinary(_) => Text::Bin(
                arrow::compute::cast(a, &DataType::Binary)?
                    .as_binary::<i32>()
                    .clone(),
            ),
            DataType::List(_) => {
                let l = a.as_list::<i32>().clone();
                let items = Text::of(l.values())?;
                Text::List(l, Box::new(items))
            }
            DataType::Utf8 => Text::Str(a.as_string::<i32>().clone()),
            _ => Text::Str(
                arrow::compute::cast(a, &DataType::Utf8)?
                    .as_string::<i32>()
                    .clone(),
            ),
        })
    }

    fn get(&self, r: usize) -> Option<Cow<'_, [u8]>> {
        match self {
            Text::Str(s) => s.is_valid(r).then(|| Cow::Borrowed(s.value(r).as_bytes())),
            Text::Bin(b) => b.is_valid(r).then(|| Cow::Borrowed(b.value(r))),
            Text::List(..) => None,
        }
    }

    /// The items of a list cell, or the one value of a scalar cell.
    fn items(&self, r: usize) -> Vec<Cow<'_, [u8]>> {
        match self {
            Text::List(l, items) => {
                if l.is_null(r) {
                    return Vec::new();
                }
                let (a, b) = (l.value_offsets()[r] as usize, l.value_offsets()[r + 1] as usize);
                (a..b).filter_map(|i| items.get(i)).collect()
            }
            t => t.get(r).into_iter().collect(),
        }
    }
}

impl RedisBackend {
    fn key(&self, texts: &[Option<Text>], r: usize) -> std::result::Result<Vec<u8>, String> {
        let l = &self.layout;
        let name = |i: usize| l.schema.field(i).name().clone();
        match (&l.template, l.key_col) {
            (Some(t), _) => {
                let mut k = Vec::new();
                for s in t {
                    match s {
                        Seg::Lit(x) => k.extend_from_slice(x.as_bytes()),
                        Seg::Col(i) => match texts[*i].as_ref().and_then(|t| t.get(r)) {
                            Some(v) => k.extend_from_slice(&v),
                            None => return Err(format!("key column {} is NULL", name(*i))),
                        },
                    }
                }
                Ok(k)
            }
            (None, Some(i)) => match texts[i].as_ref().and_then(|t| t.get(r)) {
                Some(v) if !v.is_empty() => Ok(v.into_owned()),
                _ => Err(format!("key column {} is NULL or empty", name(i))),
            },
            (None, None) => Err("no key".into()),
        }
    }
}

#[async_trait]
impl SinkBackend for RedisBackend {
    type Request = RedisRequest;

    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.layout.schema)
    }

    /// A key write replaces the key's value (hash, string, json) or member (set, zset), so
    /// `upsert` is what those types do anyway, on the Redis key. Lists and streams only append.
    /// No `overwrite`: Redis cannot switch a whole key space at once.
    fn modes(&self) -> &'static [&'static str] {
        match self.layout.kind {
            Kind::List | Kind::Stream => &["append"],
            _ => &["append", "upsert"],
        }
    }

    fn encode(&self, batch: &RecordBatch) -> Result<RedisRequest> {
        let l = &self.layout;
        if l.template.is_none() && l.key_col.is_none() {
            return Err(Error::Option(format!(
                "table {}: writes need a key: OPTIONS ('key' 'prefix:{{column}}'), or a column {} holding it",
                l.table, "_key (or 'key_column')"
            )));
        }
        let n = batch.num_rows();
        let mut texts: Vec<Option<Text>> = Vec::with_capacity(batch.num_columns());
        for (i, a) in batch.columns().iter().enumerate() {
            let used = l.kind != Kind::Json
                || Some(i) == l.key_col
                || matches!(&l.template, Some(t) if t.contains(&Seg::Col(i)));
            texts.push(if used { Some(Text::of(a)?) } else { None });
        }
        // JSON rows: the field columns as one object each (NULLs left out).
        let json_rows: Option<(Arc<Field>, StructArray)> = if l.kind == Kind::Json {
            let fields: Vec<Arc<Field>> = l
                .fields
                .iter()
                .map(|&i| Arc::new(l.schema.field(i).clone()))
                .collect();
            let cols: Vec<ArrayRef> = l.fields.iter().map(|&i| Arc::clone(batch.column(i))).collect();
            let s = StructArray::try_new(fields.into(), cols, None)?;
            Some((Arc::new(Field::new("row", s.data_type().clone(), false)), s))
        } else {
            None
        };
        let json_options = EncoderOptions::default();
        let mut json = match &json_rows {
            Some((f, s)) => Some(make_encoder(f, s, &json_options)?),
            None => None,
        };
        let ttl = l.ttl.map(|t| t.as_secs());
        let name = |i: usize| l.schema.field(i).name().as_bytes();
        let mut req = RedisRequest {
            cmds: Vec::with_capacity(n),
            rows: Vec::with_capacity(n),
            slots: Vec::with_capacity(n),
            bytes: 0,
            rejected: Vec::new(),
        };
        let mut buf = Vec::new();
        for r in 0..n {
            let key = match self.key(&texts, r) {
                Ok(k) => k,
                Err(why) => {
                    req.rejected.push((r, why));
                    continue;
                }
            };
            let s = slot(&key);
            let mut cmds: Vec<redis::Cmd> = Vec::with_capacity(2);
            let value = |i: Option<usize>| i.and_then(|i| texts[i].as_ref()).and_then(|t| t.get(r));
            match l.kind {
                Kind::Hash => {
                    let mut set = redis::cmd("HSET");
                    set.arg(&key);
                    let mut del = redis::cmd("HDEL");
                    del.arg(&key);
                    let (mut sets, mut dels) = (0, 0);
                    for &i in &l.fields {
                        match texts[i].as_ref().and_then(|t| t.get(r)) {
                            Some(v) => {
                                set.arg(name(i)).arg(v.as_ref());
                                sets += 1;
                            }
                            None => {
                                del.arg(name(i));
                                dels += 1;
                            }
                        }
                    }
                    if sets > 0 {
                        cmds.push(set);
                    }
                    if dels > 0 {
                        cmds.push(del);
                    }
                }
                Kind::String => match value(l.value_col) {
                    Some(v) => {
                        let mut c = redis::cmd("SET");
                        c.arg(&key).arg(v.as_ref());
                        if let Some(t) = ttl {
                            c.arg("EX").arg(t);
                        }
                        cmds.push(c);
                    }
                    None => cmds.push(redis::cmd("DEL").arg(&key).clone()),
                },
                Kind::Json => {
                    if let Some(enc) = json.as_mut() {
                        buf.clear();
                        enc.encode(r, &mut buf);
                        let mut c = redis::cmd("SET");
                        c.arg(&key).arg(buf.as_slice());
                        if let Some(t) = ttl {
                            c.arg("EX").arg(t);
                        }
                        cmds.push(c);
                    }
                }
                Kind::List | Kind::Set => {
                    let items = l
                        .value_col
                        .and_then(|i| texts[i].as_ref())
                        .map(|t| t.items(r))
                        .unwrap_or_default();
                    if !items.is_empty() {
                        let mut c = redis::cmd(if l.kind == Kind::List { "RPUSH" } else { "SADD" });
                        c.arg(&key);
                        for it in &items {
                            c.arg(it.as_ref());
                        }
                        cmds.push(c);
                    }
                }
                Kind::ZSet => match (value(l.value_col), value(l.score_col)) {
                    (Some(m), Some(sc)) => cmds.push(
                        redis::cmd("ZADD")
                            .arg(&key)
                            .arg(sc.as_ref())
                            .arg(m.as_ref())
                            .clone(),
                    ),
                    _ => {
                        req.rejected.push((r, "zset member or score is NULL".into()));
                        continue;
                    }
                },
                Kind::Stream => {
                    let mut c = redis::cmd("XADD");
                    c.arg(&key);
                    match value(l.id_col) {
                        Some(id) => c.arg(id.as_ref()),
                        None => c.arg("*"),
                    };
                    let mut any = false;
                    for &i in &l.fields {
                        if let Some(v) = texts[i].as_ref().and_then(|t| t.get(r)) {
                            c.arg(name(i)).arg(v.as_ref());
                            any = true;
                        }
                    }
                    if !any {
                        req.rejected
                            .push((r, "a stream entry needs at least one non-NULL field".into()));
                        continue;
                    }
                    cmds.push(c);
                }
            }
            if let (Some(t), false, false) =
                (ttl, cmds.is_empty(), matches!(l.kind, Kind::String | Kind::Json))
            {
                cmds.push(redis::cmd("EXPIRE").arg(&key).arg(t).clone());
            }
            for c in cmds {
                req.bytes += c
                    .args_iter()
                    .map(|a| match a {
                        redis::Arg::Simple(b) => b.len() + 8,
                        _ => 8,
                    })
                    .sum::<usize>();
                req.cmds.push(c);
                req.rows.push(r as u32);
                req.slots.push(s);
            }
        }
        Ok(req)
    }

    fn request_bytes(&self, request: &RedisRequest) -> usize {
        request.bytes
    }

    fn describe(&self) -> String {
        let l = &self.layout;
        format!(
            "redis {} type={}{}{}",
            self.redis.address,
            l.kind.redis_type(),
            match &l.template {
                Some(_) => format!(", key pattern {}", l.pattern),
                None => String::new(),
            },
            l.ttl
                .map(|t| format!(", ttl {}s", t.as_secs()))
                .unwrap_or_default()
        )
    }

    async fn send(&self, req: &RedisRequest, attempt: &Attempt<'_>) -> Outcome {
        attempt.bounded(self.apply(req)).await
    }
}

impl RedisBackend {
    /// Sends a request's commands, grouped by the node that owns their keys.
    async fn apply(&self, req: &RedisRequest) -> Outcome {
        let l = &self.layout;
        let mut rejected = req.rejected.clone();
        if req.cmds.is_empty() {
            return if rejected.is_empty() {
                Outcome::Delivered
            } else {
                Outcome::Partial {
                    rejected,
                    retry: Vec::new(),
                }
            };
        }
        let topo = match self.redis.topology().await {
            Ok(t) => t,
            Err(e) => {
                let reason = e.to_string();
                return if super::auth_error(&e) {
                    Outcome::Fatal { reason }
                } else {
                    Outcome::Retry { reason, after: None }
                };
            }
        };
        let mut groups: Vec<Vec<usize>> = vec![Vec::new(); topo.nodes.len()];
        for (i, &s) in req.slots.iter().enumerate() {
            groups[topo.node_of(s)].push(i);
        }
        let sends = groups
            .iter()
            .enumerate()
            .filter(|(_, g)| !g.is_empty())
            .map(|(n, g)| {
                let node = topo.nodes[n].clone();
                async move {
                    let mut conn = match self.redis.pooled(&node).await {
                        Ok(c) => c,
                        Err(e) => return (node, g, Err(e.to_string())),
                    };
                    let mut pipe = redis::pipe();
                    pipe.ignore_errors();
                    for &i in g {
                        pipe.add_command(req.cmds[i].clone());
                    }
                    let r: redis::RedisResult<Vec<Value>> = pipe.query_async(&mut conn).await;
                    (node, g, r.map_err(|e| text(&e)))
                }
            });
        let results = futures::future::join_all(sends).await;
        let mut retry_rows: Vec<usize> = Vec::new();
        let mut reason = String::new();
        let mut stale = false;
        for (node, g, r) in results {
            match r {
                Ok(values) => {
                    for (&i, v) in g.iter().zip(values) {
                        if let Value::ServerError(e) = v {
                            let row = req.rows[i] as usize;
                            let code = e.code().to_string();
                            let msg = format!("{code} {}", e.details().unwrap_or_default())
                                .trim()
                                .to_string();
                            if matches!(
                                code.as_str(),
                                "MOVED"
                                    | "ASK"
                                    | "TRYAGAIN"
                                    | "CLUSTERDOWN"
                                    | "LOADING"
                                    | "BUSY"
                                    | "MASTERDOWN"
                            ) {
                                stale |= matches!(code.as_str(), "MOVED" | "ASK" | "CLUSTERDOWN");
                                retry_rows.push(row);
                                reason = format!("redis {node}: {msg}");
                            } else if code == "NOAUTH" || code == "WRONGPASS" || code == "NOPERM" {
                                return Outcome::Fatal {
                                    reason: format!("table {}: redis {node}: {msg}", l.table),
                                };
                            } else {
                                rejected.push((row, format!("redis {msg}")));
                            }
                        }
                    }
                }
                Err(e) => {
                    if e.contains("WRONGPASS") || e.contains("NOAUTH") || e.contains("NOPERM") {
                        return Outcome::Fatal {
                            reason: format!("table {}: redis {node}: {e}", l.table),
                        };
                    }
                    self.redis.drop_node(&node);
                    retry_rows.extend(g.iter().map(|&i| req.rows[i] as usize));
                    reason = format!("redis {node}: {e}");
                }
            }
        }
        if stale {
            self.redis.invalidate();
        }
        rejected.sort_by_key(|(r, _)| *r);
        rejected.dedup_by_key(|(r, _)| *r);
        retry_rows.sort_unstable();
        retry_rows.dedup();
        retry_rows.retain(|r| rejected.binary_search_by_key(r, |(x, _)| *x).is_err());
        let all_rows = {
            let mut v: Vec<u32> = req.rows.clone();
            v.dedup();
            v.len()
        };
        match (rejected.is_empty(), retry_rows.is_empty()) {
            (true, true) => Outcome::Delivered,
            (true, false) if retry_rows.len() == all_rows => Outcome::Retry { reason, after: None },
            _ => Outcome::Partial {
                rejected,
                retry: retry_rows,
            },
        }
    }
}
