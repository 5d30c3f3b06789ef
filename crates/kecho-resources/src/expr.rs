//! The two expressions of a request, in CEL over an agent's attributes (the language of kecho's content filters):
//! a requirement that must hold (`mem_free >= 2e9 && zone == "a"`) and a rank, a number where higher is better.

use kecho::filter::ContentFilter;
use kecho::{Attrs, Value};

use crate::error::Error;

/// A requirement: a CEL expression over an agent's attributes that must be true. A missing attribute, a comparison
/// across types or a non-boolean result makes it false (the agent cannot serve).
#[derive(Debug)]
pub struct Requirement {
    filter: ContentFilter,
}

impl Requirement {
    /// Compiles `expr`; a malformed one gives its line and column.
    pub fn compile(expr: &str) -> Result<Self, Error> {
        let filter = ContentFilter::compile(expr).map_err(|source| Error::Expr { which: "require", source })?;
        Ok(Requirement { filter })
    }
    /// The source text.
    pub fn expr(&self) -> &str {
        self.filter.expr()
    }
    /// True if an agent with these attributes satisfies it.
    pub fn matches(&self, attrs: &Attrs) -> bool {
        self.filter.matches("agent", attrs)
    }
}

/// A rank: a CEL expression over an agent's attributes that yields a number, higher is better (`cpus_free`,
/// `mem_free / 1e9 - host_load1`). An agent for which it does not evaluate to a number ranks below every other.
pub struct Rank {
    expr: String,
    program: cel::Program,
    /// The attribute's name when the rank is one attribute (`cpus_free`, the common case): read directly, without
    /// building the interpreter's variables.
    var: Option<String>,
}

impl std::fmt::Debug for Rank {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rank").field("expr", &self.expr).finish()
    }
}

impl Rank {
    /// Compiles `expr`; a malformed one gives its line and column.
    pub fn compile(expr: &str) -> Result<Self, Error> {
        // The content filter's compiler gives positioned errors and guards the parser's panics; once it accepts the
        // text, the parser accepts it again here.
        ContentFilter::compile(expr).map_err(|source| Error::Expr { which: "rank", source })?;
        let program = std::panic::catch_unwind(|| cel::Program::compile(expr))
            .ok()
            .and_then(Result::ok)
            .ok_or_else(|| Error::Config(format!("rank expression `{expr}` could not be compiled")))?;
        let var = match &program.expression().expr {
            cel::common::ast::Expr::Ident(name) => Some(name.clone()),
            _ => None,
        };
        Ok(Rank { expr: expr.to_owned(), program, var })
    }
    /// The source text.
    pub fn expr(&self) -> &str {
        &self.expr
    }
    /// The rank of an agent with these attributes, `None` if it is not a finite number.
    pub fn eval(&self, attrs: &Attrs) -> Option<f64> {
        let v = match &self.var {
            Some(name) => match attrs.get(name)? {
                Value::Int(i) => *i as f64,
                Value::Float(f) => *f,
                Value::Bool(b) => f64::from(u8::from(*b)),
                _ => return None,
            },
            None => {
                // The attributes as content filters see them (kecho's conversion).
                let mut ctx = cel::Context::default();
                kecho::filter::add_cel_variables(&mut ctx, attrs);
                match self.program.execute(&ctx).ok()? {
                    cel::Value::Int(i) => i as f64,
                    cel::Value::UInt(u) => u as f64,
                    cel::Value::Float(f) => f,
                    cel::Value::Bool(b) => f64::from(u8::from(b)),
                    _ => return None,
                }
            }
        };
        v.is_finite().then_some(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requirement_and_rank() {
        let a = Attrs::new().with("mem_free", 3_000_000_000i64).with("zone", "a").with("cpus_free", 3i64);
        assert!(Requirement::compile("mem_free >= 2e9 && zone == \"a\"").unwrap().matches(&a));
        assert!(!Requirement::compile("gpu_free >= 1").unwrap().matches(&a));
        assert_eq!(Rank::compile("cpus_free * 2").unwrap().eval(&a), Some(6.0));
        // A bare attribute is read directly, with the interpreter's results.
        assert_eq!(Rank::compile("cpus_free").unwrap().eval(&a), Some(3.0));
        assert_eq!(Rank::compile("(cpus_free)").unwrap().eval(&a), Some(3.0));
        assert_eq!(Rank::compile("gpu_free").unwrap().eval(&a), None);
        assert_eq!(Rank::compile("zone").unwrap().eval(&Attrs::new().with("zone", 1.5f64)), Some(1.5));
        let nan = Attrs::new().with("x", f64::NAN);
        assert_eq!(Rank::compile("x").unwrap().eval(&nan), None);
        assert_eq!(Rank::compile("x + 0.0").unwrap().eval(&nan), None);
        assert_eq!(Rank::compile("double(mem_free) / 1e9").unwrap().eval(&a), Some(3.0));
        // CEL does not mix int and double in arithmetic: such a rank does not evaluate.
        assert_eq!(Rank::compile("mem_free / 1e9").unwrap().eval(&a), None);
        assert_eq!(Rank::compile("zone").unwrap().eval(&a), None);
        assert_eq!(Rank::compile("nothing + 1").unwrap().eval(&a), None);
    }

    #[test]
    fn malformed_expressions_are_positioned() {
        let e = Requirement::compile("mem_free >= && zone == \"a\"").unwrap_err();
        match e {
            Error::Expr { which, source } => {
                assert_eq!(which, "require");
                assert_eq!(source.line, 1);
                assert!(source.column > 1, "{source}");
            }
            other => panic!("unexpected {other}"),
        }
        assert!(matches!(Rank::compile("cpus_free +"), Err(Error::Expr { which: "rank", .. })));
        assert!(Requirement::compile("   ").is_err());
    }
}
