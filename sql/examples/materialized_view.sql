-- Materialized views on the bundled orders, kept as Parquet in the warehouse (--warehouse,
-- default .flumen/warehouse).            run: flumen run sql/examples/materialized_view.sql
-- Later runs see the views without declaring anything; refresh them with
--   flumen sql -e 'REFRESH MATERIALIZED VIEW revenue_by_city INCREMENTAL'
CREATE EXTERNAL TABLE orders STORED AS CSV LOCATION '${DATA:-data}/orders.csv'
  OPTIONS ('has_header' 'true');

-- Incremental: each refresh reads only orders past the highest order_id loaded so far and
-- merges them into the stored sums, counts and averages.
CREATE MATERIALIZED VIEW IF NOT EXISTS revenue_by_city OPTIONS ('watermark' 'order_id') AS
SELECT city, status, sum(amount) AS revenue, count(*) AS orders, avg(amount) AS avg_amount,
       max(created_at) AS last_order
FROM orders
GROUP BY city, status;

-- Refreshed in full (a distinct count cannot be merged from partial counts).
CREATE MATERIALIZED VIEW IF NOT EXISTS buyers_by_city AS
SELECT city, count(DISTINCT user_id) AS buyers FROM orders GROUP BY city;

REFRESH MATERIALIZED VIEW revenue_by_city INCREMENTAL;

SELECT r.city, sum(r.revenue) AS revenue, sum(r.orders) AS orders, max(b.buyers) AS buyers
FROM revenue_by_city r JOIN buyers_by_city b USING (city)
GROUP BY r.city ORDER BY revenue DESC LIMIT 5;

SHOW MATERIALIZED VIEWS;
