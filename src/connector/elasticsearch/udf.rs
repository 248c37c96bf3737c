//! `match(column, 'words')`: full-text search, evaluated by the search server.
//!
//! In a `WHERE` on an ELASTICSEARCH table it becomes the query DSL `{"match": {column: words}}`
//! (analysed full text, as the index's mapping says); anywhere else there is nothing to run it
//! on, and it is an error saying so.

use datafusion::arrow::datatypes::DataType;
use datafusion::common::{Result, plan_err};
use datafusion::logical_expr::{ColumnarValue, ScalarFunctionArgs, ScalarUDFImpl, Signature, Volatility};

/// The `match` function.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct MatchUdf {
    signature: Signature,
}

impl Default for MatchUdf {
    fn default() -> Self {
        Self {
            signature: Signature::string(2, Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for MatchUdf {
    fn name(&self) -> &str {
        "match"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(DataType::Boolean)
    }

    fn invoke_with_args(&self, _args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        plan_err!(
            "match(column, 'words') is full-text search run by the search server: use it in the WHERE of a query on an ELASTICSEARCH table, directly on a column and a string"
        )
    }
}
