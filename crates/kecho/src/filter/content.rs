//! Content filters: a sink's CEL expression over an event's type and attributes, parsed by the `cel` crate; the
//! common subset is evaluated directly on the attributes, the rest by the crate's interpreter.

use std::sync::Arc;

use kecho_proto::{Attrs, Value};

use super::FilterError;

/// A sink's content filter: a CEL expression over the event's `type` and its attributes (each attribute is a
/// variable of its own name), e.g. `type == "load" && cpu > 0.8 && zone in ["a", "b"]`. Compiled once; an
/// expression that refers to an attribute the event lacks, or does not yield a boolean, rejects the event.
pub struct ContentFilter {
    expr: String,
    program: cel::Program,
    /// The same expression compiled for direct evaluation over attributes, when it stays within the common subset.
    fast: Option<Fast>,
}

impl std::fmt::Debug for ContentFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContentFilter").field("expr", &self.expr).finish()
    }
}

impl ContentFilter {
    /// Compiles `expr`.
    pub fn compile(expr: &str) -> Result<Self, FilterError> {
        if expr.trim().is_empty() {
            return Err(FilterError {
                line: 1,
                column: 1,
                message: "the expression is empty".into(),
                expr: expr.to_owned(),
                marker: "^".into(),
            });
        }
        // The parser can panic on some malformed inputs; a sink's bad expression must never take a node down.
        let parsed = std::panic::catch_unwind(|| cel::Program::compile(expr));
        match parsed {
            Ok(Ok(program)) => {
                let fast = Fast::compile(program.expression());
                Ok(ContentFilter { expr: expr.to_owned(), program, fast })
            }
            Ok(Err(errs)) => {
                let first = errs.errors.first();
                // The parser reports 1-based lines and columns.
                let (line, column) = first.map_or((1, 1), |e| (e.pos.0.max(1) as usize, e.pos.1.max(1) as usize));
                let message = first.map_or_else(|| errs.to_string(), |e| e.msg.clone());
                let marker = format!("{}^", " ".repeat(column.saturating_sub(1)));
                Err(FilterError { line, column, message, expr: expr.to_owned(), marker })
            }
            Err(_) => Err(FilterError {
                line: 1,
                column: 1,
                message: "the expression could not be parsed".into(),
                expr: expr.to_owned(),
                marker: "^".into(),
            }),
        }
    }

    /// The source text.
    pub fn expr(&self) -> &str {
        &self.expr
    }

    /// Evaluates against one event.
    pub fn matches(&self, ty: &str, attrs: &Attrs) -> bool {
        if let Some(m) = self.fast_matches(ty, attrs) {
            return m;
        }
        let root = cel::Context::default();
        let ctx = FilterContext::new(&root, ty, attrs);
        self.matches_in(&ctx)
    }

    /// Evaluates with the direct evaluator; `None` if the expression needs the CEL interpreter.
    pub(crate) fn fast_matches(&self, ty: &str, attrs: &Attrs) -> Option<bool> {
        self.fast.as_ref().map(|f| f.eval(ty, attrs) == Some(true))
    }

    /// True if the direct evaluator handles this expression.
    pub fn is_fast(&self) -> bool {
        self.fast.is_some()
    }

    pub(crate) fn matches_in(&self, ctx: &FilterContext<'_>) -> bool {
        matches!(self.program.execute(&ctx.ctx), Ok(cel::Value::Bool(true)))
    }
}

/// A direct evaluator for the common subset of CEL that content filters use: `type` and attribute variables, int,
/// double, string and bool literals, comparisons, `in` with a literal list, `&&`, `||` and `!`. It walks the AST the
/// `cel` parser produced, over the event's attributes as they are, without building CEL values; anything outside the
/// subset keeps the interpreter. The results follow CEL's: a missing variable or a comparison across types is an
/// error, `&&` and `||` absorb an error when the other side decides, and an error rejects the event.
#[derive(Debug, Clone)]
enum Fast {
    Lit(Lit),
    Type,
    Var(String),
    Not(Box<Fast>),
    And(Box<Fast>, Box<Fast>),
    Or(Box<Fast>, Box<Fast>),
    Cmp(Box<Fast>, CmpOp, Box<Fast>),
    In(Box<Fast>, Vec<Lit>),
}

#[derive(Debug, Clone, PartialEq)]
enum Lit {
    Int(i64),
    Float(f64),
    Str(String),
    Bool(bool),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// A value during direct evaluation, borrowed from the event.
#[derive(Debug, Clone, Copy)]
enum V<'a> {
    Int(i64),
    Float(f64),
    Str(&'a str),
    Bool(bool),
}

impl Fast {
    fn compile(e: &cel::IdedExpr) -> Option<Fast> {
        use cel::common::ast::{operators as op, Expr, LiteralValue};
        Some(match &e.expr {
            Expr::Ident(name) if name == "type" => Fast::Type,
            Expr::Ident(name) => Fast::Var(name.clone()),
            Expr::Literal(lit) => Fast::Lit(match lit {
                LiteralValue::Boolean(b) => Lit::Bool(**b),
                LiteralValue::Int(i) => Lit::Int(**i),
                LiteralValue::Double(d) => Lit::Float(**d),
                LiteralValue::String(s) => Lit::Str(s.inner().to_owned()),
                _ => return None,
            }),
            Expr::Call(call) if call.target.is_none() => {
                let args = &call.args;
                let bin = |f: fn(Box<Fast>, Box<Fast>) -> Fast| -> Option<Fast> {
                    match args.as_slice() {
                        [a, b] => Some(f(Box::new(Fast::compile(a)?), Box::new(Fast::compile(b)?))),
                        _ => None,
                    }
                };
                let cmp = |o: CmpOp| -> Option<Fast> {
                    match args.as_slice() {
                        [a, b] => Some(Fast::Cmp(Box::new(Fast::compile(a)?), o, Box::new(Fast::compile(b)?))),
                        _ => None,
                    }
                };
                match call.func_name.as_str() {
                    op::LOGICAL_AND => bin(Fast::And)?,
                    op::LOGICAL_OR => bin(Fast::Or)?,
                    op::LOGICAL_NOT => match args.as_slice() {
                        [a] => Fast::Not(Box::new(Fast::compile(a)?)),
                        _ => return None,
                    },
                    op::EQUALS => cmp(CmpOp::Eq)?,
                    op::NOT_EQUALS => cmp(CmpOp::Ne)?,
                    op::LESS => cmp(CmpOp::Lt)?,
                    op::LESS_EQUALS => cmp(CmpOp::Le)?,
                    op::GREATER => cmp(CmpOp::Gt)?,
                    op::GREATER_EQUALS => cmp(CmpOp::Ge)?,
                    op::IN => match args.as_slice() {
                        [a, list] => {
                            let Expr::List(l) = &list.expr else { return None };
                            let mut lits = Vec::new();
                            for el in &l.elements {
                                match Fast::compile(el)? {
                                    Fast::Lit(lit) => lits.push(lit),
                                    _ => return None,
                                }
                            }
                            Fast::In(Box::new(Fast::compile(a)?), lits)
                        }
                        _ => return None,
                    },
                    _ => return None,
                }
            }
            _ => return None,
        })
    }

    /// `Some(bool)`, or `None` for a CEL error (or a non-boolean result at the top).
    fn eval(&self, ty: &str, attrs: &Attrs) -> Option<bool> {
        match self.value(ty, attrs)? {
            V::Bool(b) => Some(b),
            _ => None,
        }
    }

    fn value<'a>(&'a self, ty: &'a str, attrs: &'a Attrs) -> Option<V<'a>> {
        Some(match self {
            Fast::Lit(l) => lit(l),
            Fast::Type => V::Str(ty),
            Fast::Var(name) => match attrs.get(name)? {
                Value::Int(i) => V::Int(*i),
                Value::Float(f) => V::Float(*f),
                Value::Bool(b) => V::Bool(*b),
                Value::Str(s) => V::Str(s),
                // Bytes stay with the interpreter's semantics: treated as an error here.
                Value::Bytes(_) => return None,
            },
            Fast::Not(a) => V::Bool(!a.eval(ty, attrs)?),
            // The right side is evaluated only when the left does not decide (an error on the left still lets the
            // right decide, as in CEL): `type == "a" || to == "b"` costs one comparison for events of type `a`.
            Fast::And(a, b) => match a.eval(ty, attrs) {
                Some(false) => V::Bool(false),
                Some(true) => V::Bool(b.eval(ty, attrs)?),
                None => match b.eval(ty, attrs) {
                    Some(false) => V::Bool(false),
                    _ => return None,
                },
            },
            Fast::Or(a, b) => match a.eval(ty, attrs) {
                Some(true) => V::Bool(true),
                Some(false) => V::Bool(b.eval(ty, attrs)?),
                None => match b.eval(ty, attrs) {
                    Some(true) => V::Bool(true),
                    _ => return None,
                },
            },
            Fast::Cmp(a, o, b) => V::Bool(compare(a.value(ty, attrs)?, *o, b.value(ty, attrs)?)?),
            Fast::In(a, list) => {
                let x = a.value(ty, attrs)?;
                let mut found = false;
                for l in list {
                    if compare(x, CmpOp::Eq, lit(l))? {
                        found = true;
                        break;
                    }
                }
                V::Bool(found)
            }
        })
    }
}

fn lit(l: &Lit) -> V<'_> {
    match l {
        Lit::Int(i) => V::Int(*i),
        Lit::Float(f) => V::Float(*f),
        Lit::Str(s) => V::Str(s),
        Lit::Bool(b) => V::Bool(*b),
    }
}

/// CEL comparison: numbers compare across int and double; equality across other types is false; ordering across
/// types is an error.
fn compare(a: V<'_>, o: CmpOp, b: V<'_>) -> Option<bool> {
    use std::cmp::Ordering as O;
    // Strings of different lengths are unequal without comparing their bytes (most equality tests in filters fail).
    match (a, o, b) {
        (V::Str(x), CmpOp::Eq, V::Str(y)) => return Some(x == y),
        (V::Str(x), CmpOp::Ne, V::Str(y)) => return Some(x != y),
        _ => {}
    }
    let ord: Option<O> = match (a, b) {
        (V::Int(x), V::Int(y)) => Some(x.cmp(&y)),
        (V::Int(x), V::Float(y)) => (x as f64).partial_cmp(&y),
        (V::Float(x), V::Int(y)) => x.partial_cmp(&(y as f64)),
        (V::Float(x), V::Float(y)) => x.partial_cmp(&y),
        (V::Str(x), V::Str(y)) => Some(x.cmp(y)),
        (V::Bool(x), V::Bool(y)) => Some(x.cmp(&y)),
        _ => {
            return match o {
                CmpOp::Eq => Some(false),
                CmpOp::Ne => Some(true),
                _ => None,
            }
        }
    };
    Some(match (o, ord) {
        (CmpOp::Eq, ord) => ord == Some(O::Equal),
        (CmpOp::Ne, ord) => ord != Some(O::Equal),
        // NaN: every ordering is false.
        (_, None) => false,
        (CmpOp::Lt, Some(x)) => x == O::Less,
        (CmpOp::Le, Some(x)) => x != O::Greater,
        (CmpOp::Gt, Some(x)) => x == O::Greater,
        (CmpOp::Ge, Some(x)) => x != O::Less,
    })
}

/// The CEL interpreter's root context, built once per source and kept.
pub(crate) type CelRoot = cel::Context<'static, 'static>;

/// One event's variables, built once and shared by every sink's content filter.
pub(crate) struct FilterContext<'a> {
    ctx: cel::Context<'a, 'static>,
}

impl<'a> FilterContext<'a> {
    pub(crate) fn new(root: &'a CelRoot, ty: &str, attrs: &Attrs) -> Self {
        let mut ctx = root.new_inner_scope();
        ctx.add_variable_from_value("type", ty.to_owned());
        add_cel_variables(&mut ctx, attrs);
        FilterContext { ctx }
    }
}

/// The CEL value an attribute value is in content filters: ints, doubles, bools, strings and bytes as themselves.
pub fn cel_value(v: &Value) -> cel::Value {
    match v {
        Value::Int(i) => cel::Value::Int(*i),
        Value::Float(f) => cel::Value::Float(*f),
        Value::Bool(b) => cel::Value::Bool(*b),
        Value::Str(s) => cel::Value::String(Arc::new(s.clone())),
        Value::Bytes(b) => cel::Value::Bytes(Arc::new(b.to_vec())),
    }
}

/// Adds every attribute to `ctx` as a CEL variable of its own name, as content filters see them, so that other
/// CEL expressions over attributes (a resource request's rank, say) read them the same way.
pub fn add_cel_variables(ctx: &mut cel::Context<'_, '_>, attrs: &Attrs) {
    for (k, v) in attrs.iter() {
        ctx.add_variable_from_value(k.to_owned(), cel_value(v));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_evaluation_agrees_with_the_interpreter() {
        let exprs = [
            r#"type == "load" && cpu > 0.8 && zone in ["a", "b"]"#,
            "cpu >= 0.5 || n < 3",
            "!(n == 2) && ok",
            "n != 1 || zone == \"c\"",
            "cpu > n",
            "zone < \"b\"",
            "ok == true && n in [1, 2, 3]",
            "missing > 1 || ok",
            "missing > 1 && ok",
            "zone > 1",
            "cpu == 1",
            "type != \"load\"",
            // Short-circuits: the side that does not decide may be an error or missing.
            "ok || missing > 1",
            "!ok && zone > 1",
            "zone > 1 || ok",
            "zone > 1 && !ok",
            "missing == 1 || (n > 2 && zone == \"a\")",
            "zone == \"bb\" || zone != \"c\"",
            "type == \"load\" || zone == \"a\"",
        ];
        let mut seed = 12345u64;
        let mut next = move |n: u64| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        let root = cel::Context::default();
        for expr in exprs {
            let f = ContentFilter::compile(expr).unwrap();
            assert!(f.is_fast(), "{expr} should be in the fast subset");
            for _ in 0..300 {
                let mut attrs = Attrs::new();
                if next(5) > 0 {
                    attrs.set("cpu", next(11) as f64 / 10.0);
                }
                if next(5) > 0 {
                    attrs.set("n", next(5) as i64);
                }
                if next(5) > 0 {
                    attrs.set("zone", ["a", "b", "c"][next(3) as usize]);
                }
                if next(5) > 0 {
                    attrs.set("ok", next(2) == 1);
                }
                let ty = ["load", "other"][next(2) as usize];
                let slow = f.matches_in(&FilterContext::new(&root, ty, &attrs));
                assert_eq!(f.fast_matches(ty, &attrs), Some(slow), "{expr} on {ty} {attrs:?}");
            }
        }
        // Outside the subset the interpreter is used.
        assert!(!ContentFilter::compile("size(zone) > 0").unwrap().is_fast());
    }

    #[test]
    fn content_filters_evaluate_and_errors_have_positions() {
        let f = ContentFilter::compile(r#"type == "load" && cpu > 0.8 && zone in ["a", "b"]"#).unwrap();
        let attrs = |cpu: f64, zone: &str| Attrs::new().with("cpu", cpu).with("zone", zone);
        assert!(f.matches("load", &attrs(0.9, "a")));
        assert!(!f.matches("load", &attrs(0.5, "a")));
        assert!(!f.matches("load", &attrs(0.9, "c")));
        assert!(!f.matches("other", &attrs(0.9, "a")));
        // A missing attribute rejects instead of failing.
        assert!(!f.matches("load", &Attrs::new()));
        let e = ContentFilter::compile("cpu > && zone").unwrap_err();
        assert_eq!((e.line, e.column), (1, 7), "{e:?}");
        assert_eq!(e.caret(), "cpu > && zone\n      ^");
        assert!(e.to_string().contains("column"), "{e}");
        assert!(ContentFilter::compile("   ").is_err());
    }
}
