//! Validation rules a sink table declares, checked as vectorized filters before its backend
//! sees a row: `OPTIONS ('not_null' 'id,ts', 'validate' 'amount >= 0 AND email LIKE ''%@%''',
//! 'unique' 'id')`.
//!
//! A row that breaks a rule goes to the table's dead letters with the rule in `_error`
//! (`rule not_null: id is NULL`, `rule validate: <condition> is false`, `rule unique: (id)
//! repeats an earlier row`) and counts against `max_rejected`; the summary and the ledger count
//! the rows per rule. Rules are checked in that order and a row is reported under the first one
//! it breaks.
//!
//! - `validate` follows SQL `CHECK`: a condition that is NULL (a NULL operand) passes; add the
//!   column to `not_null` to refuse NULLs.
//! - `unique` holds within one statement: the keys seen so far are kept in memory (about the
//!   key's bytes per distinct row), the first row of a key passes and later ones are rejected.

use std::collections::HashSet;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, BooleanArray, BooleanBuilder, RecordBatch};
use arrow::datatypes::SchemaRef;
use arrow::row::{RowConverter, SortField};
use datafusion::common::DFSchema;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::prelude::SessionContext;

use crate::error::{Error, Result};

/// The rules as the options give them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleOptions {
    pub validate: Option<String>,
    pub not_null: Vec<String>,
    pub unique: Vec<String>,
}

impl RuleOptions {
    pub fn is_empty(&self) -> bool {
        self.validate.is_none() && self.not_null.is_empty() && self.unique.is_empty()
    }
}

/// The rules compiled against a sink's schema.
pub struct Rules {
    not_null: Vec<(String, usize)>,
    check: Option<(String, Arc<dyn PhysicalExpr>)>,
    unique: Option<Unique>,
}

struct Unique {
    label: String,
    columns: Vec<usize>,
    converter: RowConverter,
    seen: HashSet<Box<[u8]>>,
}

/// Rows of a batch that broke a rule: `(row, reason)`, and the rule's name.
pub struct Broken {
    pub rows: Vec<(usize, String)>,
    pub by_rule: Vec<(&'static str, u64)>,
}

impl Rules {
    /// Compiles the rules of table `table`; `None` when it has none. An error names the option
    /// and what is wrong with it.
    pub fn new(table: &str, o: &RuleOptions, schema: &SchemaRef) -> Result<Option<Self>> {
        if o.is_empty() {
            return Ok(None);
        }
        let index = |option: &str, c: &str| {
            schema.index_of(c).map_err(|_| {
                Error::Option(format!(
                    "table {table}: option '{option}': no column '{c}' (columns: {})",
                    crate::connector::options::column_names(schema)
                ))
            })
        };
        let not_null = o
            .not_null
            .iter()
            .map(|c| index("not_null", c).map(|i| (c.clone(), i)))
            .collect::<Result<Vec<_>>>()?;
        let check = match &o.validate {
            None => None,
            Some(sql) => {
                let bad = |e: &dyn std::fmt::Display| {
                    Error::Option(format!("table {table}: option 'validate' '{sql}': {e}"))
                };
                let ctx = SessionContext::new();
                let df = DFSchema::try_from(schema.as_ref().clone()).map_err(|e| bad(&e))?;
                let expr = ctx.parse_sql_expr(sql, &df).map_err(|e| bad(&e))?;
                let phys = ctx.create_physical_expr(expr, &df).map_err(|e| bad(&e))?;
                if phys.data_type(schema).map_err(|e| bad(&e))? != arrow::datatypes::DataType::Boolean {
                    return Err(bad(&"the condition is not true or false"));
                }
                Some((sql.clone(), phys))
            }
        };
        let unique = if o.unique.is_empty() {
            None
        } else {
            let columns = o
                .unique
                .iter()
                .map(|c| index("unique", c))
                .collect::<Result<Vec<_>>>()?;
            let fields = columns
                .iter()
                .map(|i| SortField::new(schema.field(*i).data_type().clone()))
                .collect();
            Some(Unique {
                label: format!("({})", o.unique.join(", ")),
                columns,
                converter: RowConverter::new(fields)?,
                seen: HashSet::new(),
            })
        };
        Ok(Some(Self {
            not_null,
            check,
            unique,
        }))
    }

    /// Checks a batch: the rows that pass, and those that broke a rule.
    pub fn check(&mut self, batch: &RecordBatch) -> Result<(RecordBatch, Broken)> {
        let n = batch.num_rows();
        // The first rule each row breaks.
        let mut broken: Vec<Option<(&'static str, String)>> = vec![None; n];
        for (name, i) in &self.not_null {
            let col = batch.column(*i);
            if col.null_count() == 0 {
                continue;
            }
            for (r, b) in broken.iter_mut().enumerate() {
                if b.is_none() && col.is_null(r) {
                    *b = Some(("not_null", format!("rule not_null: {name} is NULL")));
                }
            }
        }
        if let Some((sql, expr)) = &self.check {
            let v = expr.evaluate(batch)?.into_array(n)?;
            let Some(ok) = v.as_any().downcast_ref::<BooleanArray>() else {
                return Err(Error::Config(format!(
                    "option 'validate' '{sql}': the condition is not true or false"
                )));
            };
            for (r, b) in broken.iter_mut().enumerate() {
                // NULL passes, as in a SQL CHECK.
                if b.is_none() && ok.is_valid(r) && !ok.value(r) {
                    *b = Some(("validate", format!("rule validate: {sql} is false")));
                }
            }
        }
        if let Some(u) = &mut self.unique {
            let cols: Vec<ArrayRef> = u.columns.iter().map(|i| Arc::clone(batch.column(*i))).collect();
            let rows = u.converter.convert_columns(&cols)?;
            for (r, b) in broken.iter_mut().enumerate() {
                if b.is_some() {
                    continue;
                }
                if !u.seen.insert(rows.row(r).as_ref().into()) {
                    *b = Some((
                        "unique",
                        format!("rule unique: {} repeats an earlier row", u.label),
                    ));
                }
            }
        }
        let mut keep = BooleanBuilder::with_capacity(n);
        let mut out = Broken {
            rows: Vec::new(),
            by_rule: Vec::new(),
        };
        for (r, b) in broken.into_iter().enumerate() {
            keep.append_value(b.is_none());
            if let Some((rule, why)) = b {
                match out.by_rule.iter_mut().find(|(x, _)| *x == rule) {
                    Some(e) => e.1 += 1,
                    None => out.by_rule.push((rule, 1)),
                }
                out.rows.push((r, why));
            }
        }
        if out.rows.is_empty() {
            return Ok((batch.clone(), out));
        }
        let passed = arrow::compute::filter_record_batch(batch, &keep.finish())?;
        Ok((passed, out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};

    #[test]
    fn each_row_is_reported_under_the_first_rule_it_breaks() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, true),
            Field::new("email", DataType::Utf8, true),
        ]));
        let o = RuleOptions {
            validate: Some("email LIKE '%@%'".into()),
            not_null: vec!["id".into()],
            unique: vec!["id".into()],
        };
        let mut rules = Rules::new("t", &o, &schema).unwrap().unwrap();
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![
                Arc::new(Int64Array::from(vec![Some(1), None, Some(2), Some(1), Some(3)])),
                Arc::new(StringArray::from(vec![
                    Some("a@x"),
                    Some("b@x"),
                    Some("nope"),
                    Some("c@x"),
                    None,
                ])),
            ],
        )
        .unwrap();
        let (passed, broken) = rules.check(&batch).unwrap();
        assert_eq!(passed.num_rows(), 2);
        let reasons: Vec<(usize, &str)> = broken.rows.iter().map(|(r, w)| (*r, w.as_str())).collect();
        assert_eq!(
            reasons,
            [
                (1, "rule not_null: id is NULL"),
                (2, "rule validate: email LIKE '%@%' is false"),
                (3, "rule unique: (id) repeats an earlier row"),
            ]
        );
        // Across batches too.
        let (passed, broken) = rules.check(&batch.slice(0, 1)).unwrap();
        assert_eq!((passed.num_rows(), broken.rows.len()), (0, 1));
        let e = Rules::new(
            "t",
            &RuleOptions {
                not_null: vec!["nosuch".into()],
                ..Default::default()
            },
            &schema,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(
            e.contains("table t: option 'not_null': no column 'nosuch' (columns: id, email)"),
            "{e}"
        );
        let e = Rules::new(
            "t",
            &RuleOptions {
                validate: Some("id + 1".into()),
                ..Default::default()
            },
            &schema,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("not true or false"), "{e}");
    }
}
