-- Per-user totals over a large orders CSV: a GROUP BY with tens of millions of groups, which
-- must spill to stay inside --memory-limit.
CREATE EXTERNAL TABLE orders STORED AS CSV LOCATION '${IN}' OPTIONS ('has_header' 'true');

COPY (
  SELECT user_id, count(*) AS orders, sum(amount) AS revenue, max(created_at) AS last_order
  FROM orders
  GROUP BY user_id
) TO '${OUT}/' STORED AS PARQUET;
