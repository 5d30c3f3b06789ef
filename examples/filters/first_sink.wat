;; OUT-filter: every event goes to the first sink of the view only.
(module
  (memory (export "memory") 2)
  (func (export "kecho_buffer") (result i32) (i32.const 1024))
  (func (export "kecho_select") (param $len i32) (result i32)
    ;; No sinks: choose none.
    (if (i32.eqz (i32.load (i32.const 1028))) (then (return (i32.const 0))))
    (i32.store (i32.const 1024) (i32.const 0))
    (i32.const 1)))
